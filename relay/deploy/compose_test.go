// The deploy files are tested here by construction (no Docker engine, no
// Kubernetes): they parse, every TETHER_* variable they set is a setting of
// the binary that gets it (read from the binary's --help), the images and
// targets exist, the NATS servers get exactly the variables nats.conf reads,
// and the addresses, ports, volumes and secrets agree with each other.
package deploy

import (
	"encoding/json"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/nats-io/nats-server/v2/server"
	"go.yaml.in/yaml/v3"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/natsperm"
)

const repoRoot = "../.."

type composeFile struct {
	Name     string
	Services map[string]composeService
	Volumes  map[string]any
}

type composeService struct {
	Image string
	Build *struct {
		Context, Target string
	}
	Hostname    string
	Command     []string
	Environment map[string]string
	Volumes     []string
	Ports       []string
	DependsOn   []string `yaml:"depends_on"`
}

// readCompose parses docker-compose.yml as written (${...} kept).
func readCompose(t *testing.T) composeFile {
	t.Helper()
	b, err := os.ReadFile("docker-compose.yml")
	if err != nil {
		t.Fatal(err)
	}
	var c composeFile
	if err := yaml.Unmarshal(b, &c); err != nil {
		t.Fatalf("docker-compose.yml: %v", err)
	}
	if len(c.Services) == 0 {
		t.Fatal("docker-compose.yml: no services")
	}
	return c
}

// envExample reads env.example: the variables compose interpolates.
func envExample(t *testing.T) map[string]string {
	t.Helper()
	b, err := os.ReadFile("env.example")
	if err != nil {
		t.Fatal(err)
	}
	vars := map[string]string{}
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, v, ok := strings.Cut(line, "=")
		if !ok {
			t.Fatalf("env.example: %q is no VAR=value", line)
		}
		vars[k] = v
	}
	return vars
}

var interpRE = regexp.MustCompile(`\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)`)

// interpolate does compose's ${VAR}, ${VAR:-default}, ${VAR:?error} and
// $$ with vars; it reports the variables it met.
func interpolate(s string, vars map[string]string, seen map[string]bool) (string, error) {
	var err error
	out := interpRE.ReplaceAllStringFunc(s, func(m string) string {
		if m == "$$" {
			return "$"
		}
		sub := interpRE.FindStringSubmatch(m)
		name := sub[1] + sub[4]
		seen[name] = true
		v, set := vars[name]
		switch sub[2] {
		case ":-":
			if v == "" {
				return sub[3]
			}
		case "-":
			if !set {
				return sub[3]
			}
		case ":?", "?":
			if v == "" && (sub[2] == ":?" || !set) {
				err = fmt.Errorf("${%s}: %s", name, sub[3])
			}
		}
		return v
	})
	return out, err
}

// resolved is the compose file as docker compose would run it with vars.
func resolved(t *testing.T, c composeFile, vars map[string]string) (map[string]composeService, map[string]bool) {
	t.Helper()
	seen := map[string]bool{}
	do := func(where, s string) string {
		out, err := interpolate(s, vars, seen)
		if err != nil {
			t.Errorf("%s: %v", where, err)
		}
		return out
	}
	out := map[string]composeService{}
	for name, s := range c.Services {
		r := s
		r.Image = do(name+" image", s.Image)
		r.Environment = map[string]string{}
		for k, v := range s.Environment {
			r.Environment[k] = do(name+" "+k, v)
		}
		r.Ports = nil
		for _, p := range s.Ports {
			r.Ports = append(r.Ports, do(name+" ports", p))
		}
		r.Volumes = nil
		for _, v := range s.Volumes {
			r.Volumes = append(r.Volumes, do(name+" volumes", v))
		}
		out[name] = r
	}
	return out, seen
}

var (
	quoted  = regexp.MustCompile(`"[^"]*"`)
	confVar = regexp.MustCompile(`\$([A-Za-z_][A-Za-z0-9_]*)`)
)

// natsConfVars are the variables nats.conf reads from the environment.
func natsConfVars(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("nats.conf")
	if err != nil {
		t.Fatal(err)
	}
	var vars []string
	for line := range strings.Lines(string(b)) {
		if i := strings.IndexByte(line, '#'); i >= 0 {
			line = line[:i]
		}
		line = quoted.ReplaceAllString(line, `""`) // "$SRV.>" is a subject, not a variable
		for _, m := range confVar.FindAllStringSubmatch(line, -1) {
			vars = append(vars, m[1])
		}
	}
	slices.Sort(vars)
	return slices.Compact(vars)
}

// natsVersion is the nats-server module's version in go.mod, without "v":
// the image the deploy files run is the server make cluster builds.
func natsVersion(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, "go.mod"))
	if err != nil {
		t.Fatal(err)
	}
	for line := range strings.Lines(string(b)) {
		f := strings.Fields(line)
		if len(f) >= 2 && (f[0] == "github.com/nats-io/nats-server/v2" || (f[0] == "require" && len(f) >= 3 && f[1] == "github.com/nats-io/nats-server/v2")) {
			return strings.TrimPrefix(f[len(f)-1], "v")
		}
	}
	t.Fatal("go.mod requires no github.com/nats-io/nats-server/v2")
	return ""
}

func sortedKeys[V any](m map[string]V) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

func TestComposeParses(t *testing.T) {
	c := readCompose(t)
	vars := envExample(t)
	for k, v := range vars {
		if v == "" {
			vars[k] = "secret-" + strings.ToLower(k) // each password its own value
		}
	}
	_, seen := resolved(t, c, vars)
	for v := range seen {
		if _, ok := vars[v]; !ok {
			t.Errorf("docker-compose.yml uses ${%s}, which env.example does not list", v)
		}
	}
	for v := range vars {
		if !seen[v] {
			t.Errorf("env.example lists %s, which docker-compose.yml does not use", v)
		}
	}
	// Without .env, compose refuses to start: no empty password.
	blank := map[string]string{}
	for k, v := range envExample(t) {
		blank[k] = v
	}
	for _, s := range c.Services {
		for k, v := range s.Environment {
			if strings.Contains(k, "PASSWORD") {
				if _, err := interpolate(v, blank, map[string]bool{}); err == nil {
					t.Errorf("%s = %q is allowed empty: compose must refuse to start (${VAR:?...})", k, v)
				}
			}
		}
	}
}

// TestComposeMatchesBinaries: every service is built from a target of the
// Dockerfile or is the NATS image of go.mod's version, and every variable
// it sets is one its program reads.
func TestComposeMatchesBinaries(t *testing.T) {
	c := readCompose(t)
	stages := readDockerfile(t)
	all := specs(t)
	vars := envExample(t)
	for k, v := range vars {
		if v == "" {
			vars[k] = "secret-" + strings.ToLower(k)
		}
	}
	svcs, _ := resolved(t, c, vars)
	confVars := natsConfVars(t)
	wantImage := "nats:" + natsVersion(t)

	var relays, natsNames []string
	for _, name := range sortedKeys(svcs) {
		s := svcs[name]
		if s.Build == nil {
			if s.Image != wantImage {
				t.Errorf("%s: image %q is neither built from the Dockerfile nor %s (go.mod's nats-server)", name, s.Image, wantImage)
				continue
			}
			natsNames = append(natsNames, name)
			checkComposeNATS(t, name, s, confVars)
			continue
		}
		if ctx := filepath.Join(".", s.Build.Context); filepath.Clean(ctx) != filepath.Clean(repoRoot) {
			t.Errorf("%s: build context %s is not the repository root %s", name, s.Build.Context, repoRoot)
		}
		stage, ok := stages[s.Build.Target]
		if !ok {
			t.Errorf("%s: target %q is no stage of the Dockerfile (FROM ... AS %s); stages: %v", name, s.Build.Target, s.Build.Target, sortedKeys(stages))
			continue
		}
		binary, ok := binaries[s.Build.Target]
		if !ok {
			t.Errorf("%s: target %q runs no binary we know", name, s.Build.Target)
			continue
		}
		checkEnv(t, "docker-compose.yml "+name, binary, all[binary], sortedKeys(s.Environment))
		checkEnv(t, "Dockerfile stage "+stage.name, binary, all[binary], sortedKeys(stage.env))
		if binary == "tether-relay" {
			relays = append(relays, name)
		}
	}
	if len(natsNames) == 0 || len(relays) == 0 || svcs["controlplane"].Build == nil {
		t.Fatalf("want NATS, a controlplane service and relays; have NATS %v, relays %v", natsNames, relays)
	}
	checkComposeCluster(t, svcs, stages, all, natsNames, relays)
}

// checkComposeNATS: a NATS server gets exactly the variables nats.conf
// reads, its config file mounted, and loads it.
func checkComposeNATS(t *testing.T, name string, s composeService, confVars []string) {
	t.Helper()
	if got := sortedKeys(s.Environment); !slices.Equal(got, confVars) {
		t.Errorf("%s: environment %v, want exactly the variables nats.conf reads: %v", name, got, confVars)
	}
	i := slices.Index(s.Command, "--config")
	if i < 0 || i+1 >= len(s.Command) {
		t.Errorf("%s: command %v has no --config", name, s.Command)
		return
	}
	mounted := false
	for _, v := range s.Volumes {
		src, dst, _ := strings.Cut(v, ":")
		dst, _, _ = strings.Cut(dst, ":")
		if dst == s.Command[i+1] && filepath.Clean(src) == "nats.conf" {
			mounted = true
		}
	}
	if !mounted {
		t.Errorf("%s: %s is not ./nats.conf mounted (volumes %v)", name, s.Command[i+1], s.Volumes)
	}
	for k, v := range s.Environment {
		t.Setenv(k, v)
	}
	opts, err := server.ProcessConfigFile("nats.conf")
	if err != nil {
		t.Errorf("%s: nats.conf with its environment: %v", name, err)
		return
	}
	if len(opts.Routes) == 0 {
		t.Errorf("%s: no routes", name)
	}
	for _, r := range opts.Routes {
		if p, _ := r.User.Password(); r.User.Username() != "route" || p != s.Environment["TETHER_NATS_ROUTE_PASSWORD"] {
			t.Errorf("%s: route %s does not authenticate as route with TETHER_NATS_ROUTE_PASSWORD", name, r.Redacted())
		}
	}
}

// checkComposeCluster: the processes agree with each other.
func checkComposeCluster(t *testing.T, svcs map[string]composeService, stages map[string]*dockerStage, all map[string]spec, natsNames, relays []string) {
	t.Helper()
	var natsURLs []string
	for _, n := range natsNames {
		natsURLs = append(natsURLs, "nats://"+n+":4222")
	}
	natsEnv := svcs[natsNames[0]].Environment
	clients := append([]string{"controlplane"}, relays...)
	eff := map[string]map[string]string{}
	for _, name := range clients {
		s := svcs[name]
		e := effective(all[binaries[s.Build.Target]], stages[s.Build.Target], s.Environment)
		eff[name] = e
		role := natsperm.Relay
		if name == "controlplane" {
			role = natsperm.ControlPlane
		}
		if e["TETHER_NATS_USER"] != role.User() {
			t.Errorf("%s: TETHER_NATS_USER %q, want %q", name, e["TETHER_NATS_USER"], role.User())
		}
		wantPass := natsEnv["TETHER_NATS_"+strings.ToUpper(role.User())+"_PASSWORD"]
		if e["TETHER_NATS_PASSWORD"] != wantPass {
			t.Errorf("%s: TETHER_NATS_PASSWORD is not the %s password the NATS servers get", name, role)
		}
		if got := strings.Split(e["TETHER_NATS_URL"], ","); !slices.Equal(got, natsURLs) {
			t.Errorf("%s: TETHER_NATS_URL %v, want every NATS server %v", name, got, natsURLs)
		}
		for _, k := range []string{"TETHER_TCP_PORTS", "TETHER_DOMAIN"} {
			if e[k] != eff["controlplane"][k] {
				t.Errorf("%s: %s %q differs from the control plane's %q", name, k, e[k], eff["controlplane"][k])
			}
		}
		checkComposeVolumes(t, svcs, name, e["TETHER_DATA_DIR"])
	}
	ports, err := controlplane.ParsePortRange(eff["controlplane"]["TETHER_TCP_PORTS"])
	if err != nil {
		t.Fatal(err)
	}
	ids, clusterAddrs := map[string]string{}, map[string]string{}
	for _, name := range relays {
		e := eff[name]
		id := e["TETHER_RELAY_ID"]
		if err := controlplane.ValidRelayID(id); err != nil {
			t.Errorf("%s: %v", name, err)
		}
		if other, dup := ids[id]; dup {
			t.Errorf("%s and %s are both relay %s", other, name, id)
		}
		ids[id] = name
		host, _, err := net.SplitHostPort(e["TETHER_CLUSTER_ADDR"])
		if err != nil || (host != name && host != svcs[name].Hostname) {
			t.Errorf("%s: TETHER_CLUSTER_ADDR %q is not this service's name and a port (%v)", name, e["TETHER_CLUSTER_ADDR"], err)
		}
		if other, dup := clusterAddrs[e["TETHER_CLUSTER_ADDR"]]; dup {
			t.Errorf("%s and %s advertise the same cluster address", other, name)
		}
		clusterAddrs[e["TETHER_CLUSTER_ADDR"]] = name
		checkComposePorts(t, name, svcs[name].Ports, e, ports)
	}
	checkComposePorts(t, "controlplane", svcs["controlplane"].Ports, eff["controlplane"], controlplane.PortRange{})
}

// checkComposeVolumes: the data dir is a named volume of this service's
// own.
func checkComposeVolumes(t *testing.T, svcs map[string]composeService, name, dataDir string) {
	t.Helper()
	for _, v := range svcs[name].Volumes {
		src, dst, _ := strings.Cut(v, ":")
		if dst != dataDir {
			continue
		}
		for other, s := range svcs {
			if other != name && slices.ContainsFunc(s.Volumes, func(v string) bool { return strings.HasPrefix(v, src+":") }) {
				t.Errorf("%s and %s share the volume %s", name, other, src)
			}
		}
		return
	}
	t.Errorf("%s: no volume at its data dir %s (volumes %v)", name, dataDir, svcs[name].Volumes)
}

// checkComposePorts: only the public listeners (HTTP, HTTPS, the TCP
// lease range) are published beyond loopback, and the TCP range is the
// one the control plane leases from.
func checkComposePorts(t *testing.T, name string, ports []string, env map[string]string, leases controlplane.PortRange) {
	t.Helper()
	public := map[int]bool{}
	for _, k := range []string{"TETHER_HTTP_ADDR", "TETHER_HTTPS_ADDR"} {
		if _, p, err := net.SplitHostPort(env[k]); err == nil {
			n, _ := strconv.Atoi(p)
			public[n] = true
		}
	}
	published := map[int]bool{}
	var tcp []int
	for _, spec := range ports {
		hostIP, hostPorts, ctrPorts, err := splitPort(spec)
		if err != nil {
			t.Errorf("%s: port %q: %v", name, spec, err)
			continue
		}
		for i, c := range ctrPorts {
			isLease := leases.First != 0 && c >= int(leases.First) && c <= int(leases.Last)
			if isLease {
				tcp = append(tcp, c)
				if hostPorts[i] != c {
					t.Errorf("%s: TCP lease port %d published as %d: users would dial the wrong port", name, c, hostPorts[i])
				}
			}
			if !public[c] && !isLease && hostIP != "127.0.0.1" {
				t.Errorf("%s: port %d (not a public listener) is published on %q, beyond loopback", name, c, hostIP)
			}
			published[c] = true
		}
	}
	for p := range public {
		if !published[p] && len(ports) > 0 && leases.First != 0 {
			t.Errorf("%s: public listener %d is not published", name, p)
		}
	}
	if leases.First != 0 {
		var want []int
		for p := int(leases.First); p <= int(leases.Last); p++ {
			want = append(want, p)
		}
		slices.Sort(tcp)
		if !slices.Equal(tcp, want) {
			t.Errorf("%s: publishes TCP lease ports %s, want exactly TETHER_TCP_PORTS %s", name, ranges(tcp), leases)
		}
	}
}

// splitPort parses compose's short port syntax [IP:]HOST:CONTAINER, each
// port or range.
func splitPort(s string) (ip string, host, ctr []int, err error) {
	parts := strings.Split(s, ":")
	switch len(parts) {
	case 3:
		ip = parts[0]
		parts = parts[1:]
	case 2:
	default:
		return "", nil, nil, fmt.Errorf("want [IP:]HOST:CONTAINER")
	}
	if ip == "" {
		ip = "0.0.0.0"
	}
	if host, err = portList(parts[0]); err != nil {
		return
	}
	if ctr, err = portList(parts[1]); err != nil {
		return
	}
	if len(host) != len(ctr) {
		err = fmt.Errorf("%d host ports for %d container ports", len(host), len(ctr))
	}
	return
}

func portList(s string) ([]int, error) {
	s, _, _ = strings.Cut(s, "/")
	a, b, isRange := strings.Cut(s, "-")
	first, err := strconv.Atoi(a)
	if err != nil {
		return nil, err
	}
	last := first
	if isRange {
		if last, err = strconv.Atoi(b); err != nil {
			return nil, err
		}
	}
	var out []int
	for p := first; p <= last; p++ {
		out = append(out, p)
	}
	return out, nil
}

func ranges(ports []int) string {
	if len(ports) == 0 {
		return "none"
	}
	b, _ := json.Marshal(ports)
	if len(ports) > 6 {
		return fmt.Sprintf("%d-%d (%d ports)", ports[0], ports[len(ports)-1], len(ports))
	}
	return string(b)
}
