package natsapi

import (
	"fmt"
	"log/slog"

	"github.com/nats-io/nats.go"
	"github.com/tetherfleet/tether/controlplane/natsperm"
)

// Auth is how a Tether process authenticates to NATS. The zero value
// connects without credentials, which a Tether NATS server refuses.
type Auth struct {
	// User and Password authenticate as a user of relay/deploy/nats.conf
	// ("controlplane" or "relay"). Empty User means: no user/password.
	User, Password string
	// CredsFile is a NATS .creds file (JWT and nkey seed), for servers run
	// with decentralised auth. Empty means none; it may be combined with
	// nothing else.
	CredsFile string
	// CAFile is a PEM file of the CA that signed the NATS server's TLS
	// certificate. Empty means the system roots (for tls:// URLs).
	CAFile string
}

// ConnectOptions are the options of every NATS client of a Tether
// cluster, built here only: the role's credentials and its own inbox
// prefix (its permissions allow no other), a name shown in the server's
// monitoring, reconnection for ever (also when the first connection
// fails), permission errors reported on subscriptions, and connection
// events logged to log (nil discards them).
func ConnectOptions(auth Auth, role natsperm.Role, name string, log *slog.Logger) []nats.Option {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	opts := []nats.Option{
		nats.Name(name),
		nats.CustomInboxPrefix(role.InboxPrefix()),
		nats.MaxReconnects(-1),
		nats.RetryOnFailedConnect(true),
		nats.PermissionErrOnSubscribe(true),
		nats.DisconnectErrHandler(func(nc *nats.Conn, err error) {
			if err != nil {
				log.Warn("NATS disconnected", "err", err)
			}
		}),
		nats.ConnectHandler(func(nc *nats.Conn) { log.Info("NATS connected", "server", nc.ConnectedUrlRedacted()) }),
		nats.ReconnectHandler(func(nc *nats.Conn) { log.Info("NATS reconnected", "server", nc.ConnectedUrlRedacted()) }),
		// A failed attempt, such as refused credentials, would otherwise
		// go unseen while the client keeps trying.
		nats.ReconnectErrHandler(func(nc *nats.Conn, err error) { log.Warn("NATS connection attempt failed", "err", err) }),
		nats.ErrorHandler(func(nc *nats.Conn, sub *nats.Subscription, err error) {
			attrs := []any{"err", err}
			if sub != nil {
				attrs = append(attrs, "subject", sub.Subject)
			}
			log.Error("NATS error", attrs...)
		}),
	}
	if auth.User != "" {
		opts = append(opts, nats.UserInfo(auth.User, auth.Password))
	}
	if auth.CredsFile != "" {
		opts = append(opts, nats.UserCredentials(auth.CredsFile))
	}
	if auth.CAFile != "" {
		opts = append(opts, nats.RootCAs(auth.CAFile))
	}
	return opts
}

// Connect connects to the NATS server at url as role, with ConnectOptions
// (more options may follow them). With RetryOnFailedConnect, it returns a
// connection that is still trying when the server is not up yet; it fails
// at once on a bad option (an unreadable CA or creds file).
func Connect(url string, auth Auth, role natsperm.Role, name string, log *slog.Logger, more ...nats.Option) (*nats.Conn, error) {
	if err := role.Valid(); err != nil {
		return nil, err
	}
	if auth.CredsFile != "" && auth.User != "" {
		return nil, fmt.Errorf("NATS auth: give a user and password or a creds file, not both")
	}
	if auth.User != "" && auth.Password == "" {
		// A server whose password variable is set but empty would let
		// this user in with none: never rely on that.
		return nil, fmt.Errorf("NATS auth: user %s has an empty password (TETHER_NATS_PASSWORD or TETHER_NATS_PASSWORD_FILE)", auth.User)
	}
	nc, err := nats.Connect(url, append(ConnectOptions(auth, role, name, log), more...)...)
	if err != nil {
		return nil, fmt.Errorf("connect to NATS %s as %s: %w", url, role, err)
	}
	return nc, nil
}
