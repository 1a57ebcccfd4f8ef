package relay

import (
	"errors"
	"net"
	"slices"
	"strconv"
	"syscall"

	"github.com/tetherfleet/tether/controlplane"
)

// Busy ports. The control plane leases ports from the cluster's range; a
// port that another process of a relay's host holds would be handed out
// and then not served (reported unbound, retried). So each relay probes the
// unleased ports of the range, a slice of it before each hello (probeBatch
// binds and closes), and reports those another process holds
// (HelloRequest.BusyPorts); the control plane leases none of them while
// any live relay reports it.

const (
	// probeBatch is how many ports one probe tries: a 10 000-port range is
	// covered in 5 hellos.
	probeBatch = 2048
	// maxBusyReported bounds the busy ports one hello carries.
	maxBusyReported = 1024
)

// portProbe walks a port range in batches and remembers the busy ports.
type portProbe struct {
	r    controlplane.PortRange
	next uint16
	busy map[uint16]bool
}

func newPortProbe(r controlplane.PortRange) *portProbe {
	return &portProbe{r: r, next: r.First, busy: map[uint16]bool{}}
}

// probe tries the next batch of ports that t does not hold or want, and
// returns the busy ports known, sorted, at most maxBusyReported. The
// hello loop alone calls it.
func (p *portProbe) probe(t *tcpListeners) []uint16 {
	if p.r.First == 0 {
		return nil
	}
	held := map[uint16]bool{}
	t.mu.Lock()
	for port := range t.lns {
		held[port] = true
	}
	for port := range t.failed {
		held[port] = true // leased: reported as unbound instead
	}
	t.mu.Unlock()
	n := min(probeBatch, int(p.r.Last)-int(p.r.First)+1)
	for range n {
		port := p.next
		if p.next == p.r.Last {
			p.next = p.r.First
		} else {
			p.next++
		}
		if held[port] || t.want(port) {
			delete(p.busy, port)
			continue
		}
		ln, err := t.listen("tcp", net.JoinHostPort(t.host, strconv.Itoa(int(port))))
		if err == nil {
			ln.Close()
			delete(p.busy, port)
			continue
		}
		if errors.Is(err, syscall.EADDRINUSE) {
			p.busy[port] = true
		}
	}
	out := make([]uint16, 0, len(p.busy))
	for port := range p.busy {
		out = append(out, port)
	}
	slices.Sort(out)
	return out[:min(len(out), maxBusyReported)]
}
