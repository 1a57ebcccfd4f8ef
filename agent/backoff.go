package agent

import (
	"context"
	"math/rand/v2"
	"time"
)

// backoff is capped exponential backoff with full jitter: each wait is
// uniform in [0, min(max, base·2^n)), so a fleet that lost its relay at the
// same moment spreads its reconnects instead of storming.
type backoff struct {
	base, max time.Duration
	n         int
}

func (a *Agent) newBackoff() *backoff {
	return &backoff{base: 500 * time.Millisecond, max: a.cfg.BackoffMax}
}

func (b *backoff) next() time.Duration {
	ceil := b.max
	if b.n < 30 && b.base<<b.n < b.max {
		ceil = b.base << b.n
	}
	b.n++
	return rand.N(ceil) + time.Millisecond
}

func (b *backoff) reset() { b.n = 0 }

func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
