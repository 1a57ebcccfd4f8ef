// Package natsembed runs a NATS server inside the process, with Tether's
// users and permissions (natsperm): for the standalone relay (no port,
// in-process clients only), for tests and for a cluster on loopback (a
// listening server, or three routed into one cluster).
//
// The roles' passwords are generated for each process unless given, so
// even in-process a relay is only a relay.
package natsembed

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/nats-io/nats-server/v2/server"
	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane/natsapi"
	"github.com/tetherfleet/tether/controlplane/natsperm"
)

// Config configures StartConfig. The zero value is the standalone relay's
// server: no port, generated passwords.
type Config struct {
	// Name is the server's name. Empty means "tether-embedded".
	Name string
	// Listen is the client listener, "host:port" (port 0 picks a free
	// one). Empty means no listener: clients connect in-process only.
	Listen string
	// Passwords of the roles' users. A role missing here gets a random
	// password.
	Passwords map[natsperm.Role]string
	// ClusterListen is the route listener, "host:port" (port 0 picks a
	// free one). Empty means the server joins no cluster.
	ClusterListen string
	// Routes are the route URLs of other servers of the cluster, without
	// credentials (RoutePassword is added).
	Routes []string
	// RoutePassword authenticates routes (user "route"). Empty with
	// ClusterListen set means a random one, which only helps a lone node.
	RoutePassword string
	// Logger receives the server's notices; nil discards them.
	Logger *slog.Logger
}

// Server is a NATS server in this process.
type Server struct {
	ns        *server.Server
	passwords map[natsperm.Role]string
	routePass string
}

// Start starts a NATS server that listens on no port and waits until it
// accepts connections.
func Start() (*Server, error) { return StartConfig(Config{}) }

// StartConfig starts a NATS server and waits until it accepts connections.
func StartConfig(cfg Config) (*Server, error) {
	opts := &server.Options{
		ServerName: cfg.Name,
		DontListen: cfg.Listen == "",
		NoSigs:     true,
		NoLog:      cfg.Logger == nil,
		MaxPayload: natsperm.MaxPayload,
	}
	if opts.ServerName == "" {
		opts.ServerName = "tether-embedded"
	}
	if cfg.Listen != "" {
		host, port, err := hostPort(cfg.Listen)
		if err != nil {
			return nil, fmt.Errorf("embedded nats: listen: %w", err)
		}
		opts.Host, opts.Port = host, port
	}
	s := &Server{passwords: map[natsperm.Role]string{}}
	for _, role := range natsperm.Roles {
		pass := cfg.Passwords[role]
		if pass == "" {
			pass = randomSecret()
		}
		s.passwords[role] = pass
		opts.Users = append(opts.Users, &server.User{Username: role.User(), Password: pass, Permissions: natsperm.Permissions(role)})
	}
	if cfg.ClusterListen != "" {
		host, port, err := hostPort(cfg.ClusterListen)
		if err != nil {
			return nil, fmt.Errorf("embedded nats: cluster listen: %w", err)
		}
		s.routePass = cfg.RoutePassword
		if s.routePass == "" {
			s.routePass = randomSecret()
		}
		opts.Cluster = server.ClusterOpts{Name: "tether", Host: host, Port: port, Username: "route", Password: s.routePass}
		for _, r := range cfg.Routes {
			u, err := url.Parse(r)
			if err != nil {
				return nil, fmt.Errorf("embedded nats: route %q: %w", r, err)
			}
			u.User = url.UserPassword("route", s.routePass)
			opts.Routes = append(opts.Routes, u)
		}
	}
	ns, err := server.NewServer(opts)
	if err != nil {
		return nil, fmt.Errorf("embedded nats: %w", err)
	}
	if cfg.Logger != nil {
		ns.SetLoggerV2(&logger{cfg.Logger}, false, false, false)
	}
	ns.Start()
	if !ns.ReadyForConnections(10 * time.Second) {
		ns.Shutdown()
		return nil, fmt.Errorf("embedded nats: not ready after 10s")
	}
	s.ns = ns
	return s, nil
}

// hostPort splits "host:port"; port 0 becomes nats-server's "pick a free
// port" (-1), since its 0 means the default port.
func hostPort(addr string) (string, int, error) {
	host, p, err := net.SplitHostPort(addr)
	if err != nil {
		return "", 0, err
	}
	port, err := strconv.Atoi(p)
	if err != nil {
		return "", 0, fmt.Errorf("port %q: %w", p, err)
	}
	if port == 0 {
		port = server.RANDOM_PORT
	}
	return host, port, nil
}

func randomSecret() string {
	b := make([]byte, 24)
	rand.Read(b)
	return hex.EncodeToString(b)
}

// Auth returns the credentials of a role's user on this server.
func (s *Server) Auth(role natsperm.Role) natsapi.Auth {
	return natsapi.Auth{User: role.User(), Password: s.passwords[role]}
}

// ClientURL is the nats:// URL of the client listener, or "" when the
// server listens on no port.
func (s *Server) ClientURL() string {
	if s.ns.Addr() == nil {
		return ""
	}
	return "nats://" + s.ns.Addr().String()
}

// ClusterURL is the nats-route:// URL of the route listener (without
// credentials), or "" when the server is in no cluster.
func (s *Server) ClusterURL() string {
	if a := s.ns.ClusterAddr(); a != nil {
		return "nats-route://" + a.String()
	}
	return ""
}

// NATSServer is the underlying server, for tests that inspect it.
func (s *Server) NATSServer() *server.Server { return s.ns }

// ConnectAs opens a client connection as role, in-process, with
// natsapi.ConnectOptions (so it retries for ever if the connection drops,
// as every Tether client does).
func (s *Server) ConnectAs(role natsperm.Role, name string, more ...nats.Option) (*nats.Conn, error) {
	if err := role.Valid(); err != nil {
		return nil, err
	}
	opts := append(natsapi.ConnectOptions(s.Auth(role), role, name, nil), nats.InProcessServer(s.ns))
	nc, err := nats.Connect("", append(opts, more...)...)
	if err != nil {
		return nil, fmt.Errorf("connect to embedded nats as %s: %w", role, err)
	}
	return nc, nil
}

// Connect opens a client connection in-process, as the control plane when
// name starts with "controlplane", else as a relay.
//
// Deprecated: say the role: ConnectAs.
func (s *Server) Connect(name string) (*nats.Conn, error) {
	role := natsperm.Relay
	if strings.HasPrefix(name, "controlplane") {
		role = natsperm.ControlPlane
	}
	return s.ConnectAs(role, name)
}

// Shutdown stops the server and waits for it.
func (s *Server) Shutdown() {
	s.ns.Shutdown()
	s.ns.WaitForShutdown()
}

// Cluster is NATS servers routed into one cluster on loopback, sharing
// the roles' passwords.
type Cluster struct {
	Nodes []*Server
}

// StartCluster starts n servers on loopback ports, each routed to the
// first (they find each other from there), and waits until every server
// has a route to every other.
func StartCluster(n int, log *slog.Logger) (*Cluster, error) {
	if n < 1 {
		return nil, errors.New("embedded nats cluster: want at least one node")
	}
	c := &Cluster{}
	passwords := map[natsperm.Role]string{}
	for _, r := range natsperm.Roles {
		passwords[r] = randomSecret()
	}
	routePass := randomSecret()
	for i := range n {
		cfg := Config{
			Name: fmt.Sprintf("tether-nats-%d", i+1), Listen: "127.0.0.1:0", Passwords: passwords,
			ClusterListen: "127.0.0.1:0", RoutePassword: routePass, Logger: log,
		}
		if i > 0 {
			cfg.Routes = []string{c.Nodes[0].ClusterURL()}
		}
		s, err := StartConfig(cfg)
		if err != nil {
			c.Shutdown()
			return nil, err
		}
		c.Nodes = append(c.Nodes, s)
	}
	deadline := time.Now().Add(10 * time.Second)
	for !c.meshed() {
		if time.Now().After(deadline) {
			c.Shutdown()
			return nil, fmt.Errorf("embedded nats cluster: %d nodes not fully routed after 10s", n)
		}
		time.Sleep(10 * time.Millisecond) // polling the servers' route tables
	}
	return c, nil
}

// meshed reports whether every node has routes to every other.
func (c *Cluster) meshed() bool {
	for _, s := range c.Nodes {
		rz, err := s.ns.Routez(nil)
		if err != nil {
			return false
		}
		peers := map[string]bool{}
		for _, r := range rz.Routes {
			peers[r.RemoteID] = true
		}
		if len(peers) < len(c.Nodes)-1 {
			return false
		}
	}
	return true
}

// ClientURLs is the comma-separated client URLs of the nodes, as a NATS
// client (or TETHER_NATS_URL) takes them.
func (c *Cluster) ClientURLs() string {
	var urls []string
	for _, s := range c.Nodes {
		urls = append(urls, s.ClientURL())
	}
	return strings.Join(urls, ",")
}

// Auth returns the credentials of a role's user, the same on every node.
func (c *Cluster) Auth(role natsperm.Role) natsapi.Auth { return c.Nodes[0].Auth(role) }

// Shutdown stops every node.
func (c *Cluster) Shutdown() {
	for _, s := range c.Nodes {
		s.Shutdown()
	}
}

// logger passes the server's notices to slog.
type logger struct{ log *slog.Logger }

func (l *logger) Noticef(format string, v ...any) { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l *logger) Warnf(format string, v ...any)   { l.log.Warn(fmt.Sprintf(format, v...)) }
func (l *logger) Fatalf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l *logger) Errorf(format string, v ...any)  { l.log.Error(fmt.Sprintf(format, v...)) }
func (l *logger) Debugf(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }
func (l *logger) Tracef(format string, v ...any)  { l.log.Debug(fmt.Sprintf(format, v...)) }
