package peer_test

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"log"
	"net"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/peer"
)

// A relay serves its peers on its cluster address and carries a public
// connection to the relay that holds the device, trying the next live peer
// when one answers not here. (Compiled, not run: it needs a cluster.)
func Example() {
	var (
		cert  tls.Certificate       // this relay's peer certificate, from the control plane
		roots *x509.CertPool        // the cluster root
		peers map[string]string     // live relays: ID → cluster address, from hello
		holds func(string) net.Conn // this relay's agent stream to a device, or nil
	)
	tr, err := peer.New(peer.Config{
		RelayID: "relay-a", Cert: cert, Roots: roots,
		Handler: func(ctx context.Context, open *frames.PeerOpen, st net.Conn) {
			agent := holds(open.DeviceID)
			if agent == nil {
				frames.Write(st, &frames.StreamRefuse{Code: frames.CodeNotHere, Message: "relay-a does not hold " + open.DeviceID})
				return
			}
			// Write StreamOpen{open.Service, open.ClientAddr} to the agent's
			// stream, then splice.Splice(st, agent): the agent's answer
			// reaches the first relay unchanged.
		},
	})
	if err != nil {
		log.Fatal(err)
	}
	defer tr.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:7444") // TETHER_CLUSTER_ADDR
	if err != nil {
		log.Fatal(err)
	}
	go tr.Serve(context.Background(), ln)

	// A public connection for a device this relay does not hold:
	for id, addr := range peers {
		st, err := tr.Open(context.Background(), id, addr, &frames.PeerOpen{DeviceID: "dk3vq7x2m4n5p6r7s", Service: "web", ClientAddr: "203.0.113.9:51234"})
		if err != nil {
			continue // unreachable, or busy (errors.Is(err, peer.ErrBusy))
		}
		m, err := frames.Read(st, 0) // the answer; the client's first bytes could go first
		if r, ok := m.(*frames.StreamRefuse); ok && r.Code == frames.CodeNotHere || err != nil {
			st.Close()
			continue
		}
		// StreamAccept, or the agent's StreamRefuse: splice st with the
		// public connection, or answer the refusal; then st.Close().
		st.Close()
		return
	}
	log.Print(errors.New("no relay holds the device"))
}
