package natsperm

import (
	"encoding/json"
	"os"
	"reflect"
	"slices"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
)

// deployConf is the NATS config shipped for a cluster.
const deployConf = "../../relay/deploy/nats.conf"

// TestDeployConfMatches holds relay/deploy/nats.conf to the rules defined
// here: the same users, the same permissions, secrets from the
// environment, and no way in without credentials.
func TestDeployConfMatches(t *testing.T) {
	env := map[string]string{
		"TETHER_NATS_CONTROLPLANE_PASSWORD": "cp-secret",
		"TETHER_NATS_RELAY_PASSWORD":        "relay-secret",
		"TETHER_NATS_ROUTE_PASSWORD":        "route-secret",
		"TETHER_NATS_ROUTES":                `["nats-route://route:route-secret@nats-1:6222", "nats-route://route:route-secret@nats-2:6222", "nats-route://route:route-secret@nats-3:6222"]`,
	}
	for k, v := range env {
		t.Setenv(k, v)
	}
	opts, err := server.ProcessConfigFile(deployConf)
	if err != nil {
		t.Fatalf("load %s: %v", deployConf, err)
	}
	if opts.MaxPayload != MaxPayload {
		t.Errorf("max_payload %d, want %d", opts.MaxPayload, MaxPayload)
	}
	if opts.NoAuthUser != "" {
		t.Errorf("no_auth_user %q lets anonymous clients in", opts.NoAuthUser)
	}
	if len(opts.Nkeys) != 0 || opts.Username != "" || opts.Authorization != "" {
		t.Errorf("other ways in: nkeys %d, user %q, token set %v", len(opts.Nkeys), opts.Username, opts.Authorization != "")
	}
	passwords := map[Role]string{ControlPlane: "cp-secret", Relay: "relay-secret"}
	var names []string
	var account string
	for _, u := range opts.Users {
		names = append(names, u.Username)
		role := Role(u.Username)
		if role.Valid() != nil {
			t.Errorf("user %q is no role of ours", u.Username)
			continue
		}
		if u.Password != passwords[role] {
			t.Errorf("user %s: password not taken from the environment", u.Username)
		}
		if want := Permissions(role); !reflect.DeepEqual(u.Permissions, want) {
			t.Errorf("user %s: permissions in %s differ from natsperm.Permissions:\n conf: %s\n   go: %s", u.Username, deployConf, show(u.Permissions), show(want))
		}
		if u.Account == nil {
			t.Errorf("user %s has no account", u.Username)
		} else if account == "" {
			account = u.Account.Name
		} else if u.Account.Name != account {
			t.Errorf("users in different accounts (%s, %s): they could not talk", account, u.Account.Name)
		}
	}
	slices.Sort(names)
	if !slices.Equal(names, []string{"controlplane", "relay"}) {
		t.Errorf("users %v, want controlplane and relay", names)
	}
	if opts.Cluster.Username != "route" || opts.Cluster.Password != "route-secret" {
		t.Errorf("routes are not authenticated: user %q", opts.Cluster.Username)
	}
	if len(opts.Routes) != 3 {
		t.Errorf("%d routes, want 3", len(opts.Routes))
	}
}

// TestDeployConfNeedsSecrets: without the variables the server does not start.
func TestDeployConfNeedsSecrets(t *testing.T) {
	t.Setenv("TETHER_NATS_ROUTES", `["nats-route://route:x@nats-1:6222"]`)
	t.Setenv("TETHER_NATS_ROUTE_PASSWORD", "x")
	t.Setenv("TETHER_NATS_RELAY_PASSWORD", "x")
	t.Setenv("TETHER_NATS_CONTROLPLANE_PASSWORD", "") // restored after the test
	os.Unsetenv("TETHER_NATS_CONTROLPLANE_PASSWORD")
	if _, err := server.ProcessConfigFile(deployConf); err == nil {
		t.Fatal("loaded without TETHER_NATS_CONTROLPLANE_PASSWORD")
	}
}

func show(p *server.Permissions) string {
	b, _ := json.Marshal(p)
	return string(b)
}

func TestRoles(t *testing.T) {
	for _, r := range Roles {
		if err := r.Valid(); err != nil {
			t.Error(err)
		}
		rules := For(r)
		if len(rules.PublishAllow) == 0 || len(rules.SubscribeAllow) == 0 {
			t.Errorf("%s: no rules", r)
		}
	}
	if Role("admin").Valid() == nil {
		t.Error("unknown role accepted")
	}
	if ControlPlane.InboxPrefix() == Relay.InboxPrefix() {
		t.Error("roles share an inbox prefix")
	}
}
