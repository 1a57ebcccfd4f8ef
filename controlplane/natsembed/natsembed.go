// Package natsembed runs a NATS server inside the process, for the
// standalone relay and for tests: no port, clients connect in-process.
package natsembed

import (
	"fmt"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
)

// Server is an in-process NATS server.
type Server struct {
	ns *server.Server
}

// Start starts a NATS server that listens on no port and waits until it
// accepts connections.
func Start() (*Server, error) {
	ns, err := server.NewServer(&server.Options{
		ServerName: "tether-embedded",
		DontListen: true,
		NoSigs:     true,
		NoLog:      true,
		MaxPayload: 1 << 20,
	})
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		return nil, fmt.Errorf("embedded nats: not ready after 10s")
	}
	return &Server{ns: ns}, nil
}

// Connect opens a client connection to the server, in-process. The client
// retries for ever if the connection drops, as every Tether client does.
func (s *Server) Connect(name string) (*nats.Conn, error) {
	nc, err := nats.Connect("", nats.InProcessServer(s.ns), nats.Name(name), nats.MaxReconnects(-1))
	if err != nil {
		return nil, fmt.Errorf("connect to embedded nats: %w", err)
	}
	return nc, nil
}

// Shutdown stops the server and waits for it.
func (s *Server) Shutdown() {
	s.ns.Shutdown()
	s.ns.WaitForShutdown()
}
