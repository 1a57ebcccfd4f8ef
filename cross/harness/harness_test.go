package harness

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

func TestProcLifecycle(t *testing.T) {
	p := StartT(t, Cmd{Path: "/bin/sh", Args: []string{"-c", `echo "out $X"; echo err >&2; exec sleep 30`}, Env: []string{"X=42"}})
	if err := Poll(t.Context(), 5*time.Second, func() error {
		if p.Stdout() != "out 42\n" || p.Stderr() != "err\n" {
			return fmt.Errorf("stdout %q stderr %q", p.Stdout(), p.Stderr())
		}
		return nil
	}, p); err != nil {
		t.Fatal(err)
	}
	if cur, peak, err := p.RSS(); err != nil || cur <= 0 || peak < cur {
		t.Errorf("RSS %d peak %d: %v", cur, peak, err)
	}
	if _, err := p.CPU(); err != nil {
		t.Error(err)
	}
	if logs := p.Logs(); !strings.Contains(logs, "sh stdout") || !strings.Contains(logs, "err\n") {
		t.Errorf("Logs: %q", logs)
	}
	if err := p.Stop(5 * time.Second); err != nil {
		t.Fatal(err)
	}
	if !p.Exited() || p.ExitCode() != -1 || p.Err() == nil {
		t.Fatalf("after SIGTERM: exited %v, code %d, err %v", p.Exited(), p.ExitCode(), p.Err())
	}
}

func TestStopKillsWhatIgnoresTheSignal(t *testing.T) {
	p := StartT(t, Cmd{Path: "/bin/sh", Args: []string{"-c", `trap "" TERM; echo ready; while :; do sleep 0.05; done`}})
	if err := Poll(t.Context(), 5*time.Second, func() error {
		if p.Stdout() == "" {
			return fmt.Errorf("not ready")
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := p.StopWith(syscall.SIGTERM, 200*time.Millisecond); err == nil || !strings.Contains(err.Error(), "killed") {
		t.Fatalf("StopWith: %v", err)
	}
}

func TestPollFailsFastWhenTheProcessExits(t *testing.T) {
	p := StartT(t, Cmd{Path: "/bin/sh", Args: []string{"-c", "exit 3"}})
	begin := time.Now()
	err := Poll(t.Context(), 30*time.Second, func() error { return fmt.Errorf("never") }, p)
	if err == nil || !strings.Contains(err.Error(), "sh exited") || time.Since(begin) > 5*time.Second {
		t.Fatalf("Poll: %v after %v", err, time.Since(begin))
	}
	if p.ExitCode() != 3 {
		t.Fatalf("exit code %d", p.ExitCode())
	}
}

func TestWaitHTTP(t *testing.T) {
	var ready atomic.Bool // the first answer is 503
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !ready.Swap(true) {
			w.WriteHeader(http.StatusServiceUnavailable)
		}
	}))
	defer srv.Close()
	if err := WaitHTTP(t.Context(), srv.URL, 200, 5*time.Second); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(t.Context())
	cancel()
	if err := WaitHTTP(ctx, srv.URL+"/x", 404, time.Second); err == nil {
		t.Fatal("WaitHTTP with a cancelled context succeeded")
	}
}
