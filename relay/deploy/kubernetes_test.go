package deploy

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"go.yaml.in/yaml/v3"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/controlplane/natsperm"
)

var update = flag.Bool("update", false, "rewrite the NATS ConfigMap in kubernetes/nats.yaml from nats.conf")

const k8sDir = "kubernetes"

// object is a Kubernetes object, its spec left to decode by kind.
type object struct {
	file       string
	APIVersion string `yaml:"apiVersion"`
	Kind       string
	Metadata   struct {
		Name   string
		Labels map[string]string
	}
	Data map[string]string // ConfigMap
	Spec yaml.Node
}

type serviceSpec struct {
	Type                     string
	ClusterIP                string `yaml:"clusterIP"`
	PublishNotReadyAddresses bool   `yaml:"publishNotReadyAddresses"`
	Selector                 map[string]string
	Ports                    []struct {
		Name       string
		Port       int
		TargetPort string `yaml:"targetPort"`
	}
}

type workloadSpec struct { // StatefulSet, Deployment, PodDisruptionBudget (selector only)
	ServiceName string `yaml:"serviceName"`
	Replicas    *int
	Selector    struct {
		MatchLabels map[string]string `yaml:"matchLabels"`
	}
	Template struct {
		Metadata struct {
			Labels map[string]string
		}
		Spec podSpec
	}
	VolumeClaimTemplates []struct {
		Metadata struct{ Name string }
	} `yaml:"volumeClaimTemplates"`
}

type podSpec struct {
	EnableServiceLinks *bool `yaml:"enableServiceLinks"`
	InitContainers     []container
	Containers         []container
	Volumes            []struct {
		Name      string
		ConfigMap *struct{ Name string } `yaml:"configMap"`
		Secret    *struct {
			SecretName string `yaml:"secretName"`
			Items      []struct{ Key, Path string }
		}
	}
}

type container struct {
	Name, Image   string
	Command, Args []string
	Env           []struct {
		Name, Value string
		ValueFrom   *struct {
			SecretKeyRef *struct{ Name, Key string } `yaml:"secretKeyRef"`
			FieldRef     *struct {
				FieldPath string `yaml:"fieldPath"`
			} `yaml:"fieldRef"`
		} `yaml:"valueFrom"`
	}
	Ports []struct {
		Name          string
		ContainerPort int `yaml:"containerPort"`
	}
	VolumeMounts []struct {
		Name      string
		MountPath string `yaml:"mountPath"`
	} `yaml:"volumeMounts"`
	ReadinessProbe *probe `yaml:"readinessProbe"`
	LivenessProbe  *probe `yaml:"livenessProbe"`
}

type probe struct {
	HTTPGet *struct {
		Path string
		Port string
	} `yaml:"httpGet"`
	TCPSocket *struct{ Port string } `yaml:"tcpSocket"`
}

type kustomization struct {
	APIVersion      string `yaml:"apiVersion"`
	Kind            string
	Namespace       string
	Resources       []string
	SecretGenerator []struct {
		Name string
		Envs []string
	} `yaml:"secretGenerator"`
	Images []struct {
		Name, NewName, NewTag string
	} `yaml:"images"`
}

// manifests parses every YAML file under kubernetes/ but the
// kustomization: each document must be an object with apiVersion, kind
// and metadata.name.
func manifests(t *testing.T) (kustomization, []*object) {
	t.Helper()
	var k kustomization
	b, err := os.ReadFile(filepath.Join(k8sDir, "kustomization.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	if err := yaml.Unmarshal(b, &k); err != nil {
		t.Fatalf("kustomization.yaml: %v", err)
	}
	files, err := filepath.Glob(filepath.Join(k8sDir, "*.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	var objs []*object
	var listed []string
	for _, f := range files {
		if filepath.Base(f) == "kustomization.yaml" {
			continue
		}
		listed = append(listed, filepath.Base(f))
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		dec := yaml.NewDecoder(bytes.NewReader(b))
		for i := 1; ; i++ {
			o := &object{file: filepath.Base(f)}
			err := dec.Decode(o)
			if errors.Is(err, io.EOF) {
				break
			}
			if err != nil {
				t.Fatalf("%s, document %d: %v", f, i, err)
			}
			if o.APIVersion == "" || o.Kind == "" || o.Metadata.Name == "" {
				t.Errorf("%s, document %d: apiVersion %q, kind %q, metadata.name %q: all three are required", f, i, o.APIVersion, o.Kind, o.Metadata.Name)
				continue
			}
			objs = append(objs, o)
		}
	}
	resources := slices.Sorted(slices.Values(k.Resources))
	if !slices.Equal(resources, listed) {
		t.Errorf("kustomization.yaml resources %v, want every manifest of %s: %v", resources, k8sDir, listed)
	}
	return k, objs
}

func find(objs []*object, kind, name string) *object {
	for _, o := range objs {
		if o.Kind == kind && o.Metadata.Name == name {
			return o
		}
	}
	return nil
}

func decodeSpec[T any](t *testing.T, o *object) T {
	t.Helper()
	var s T
	if err := o.Spec.Decode(&s); err != nil {
		t.Fatalf("%s %s/%s: spec: %v", o.file, o.Kind, o.Metadata.Name, err)
	}
	return s
}

// TestKubernetesNATSConfig: the ConfigMap holds nats.conf verbatim
// (go test ./relay/deploy -update rewrites it).
func TestKubernetesNATSConfig(t *testing.T) {
	conf, err := os.ReadFile("nats.conf")
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(k8sDir, "nats.yaml")
	if *update {
		b, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		const head = "  nats.conf: |\n"
		i := bytes.Index(b, []byte(head))
		j := bytes.Index(b, []byte("\n---\n"))
		if i < 0 || j < i {
			t.Fatalf("%s: no %q block before the first ---", path, head)
		}
		var block bytes.Buffer
		for line := range strings.Lines(string(conf)) {
			if strings.TrimSpace(line) == "" {
				block.WriteString("\n")
			} else {
				block.WriteString("    " + line)
			}
		}
		out := slices.Concat(b[:i+len(head)], bytes.TrimSuffix(block.Bytes(), []byte("\n")), b[j:])
		if err := os.WriteFile(path, out, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	_, objs := manifests(t)
	cm := find(objs, "ConfigMap", "tether-nats-config")
	if cm == nil {
		t.Fatal("no ConfigMap tether-nats-config")
	}
	if cm.Data["nats.conf"] != string(conf) {
		t.Errorf("ConfigMap tether-nats-config differs from nats.conf: run go test ./relay/deploy -run TestKubernetesNATSConfig -update")
	}
}

// TestKubernetesManifests: the objects refer to each other correctly, and
// every variable is a setting of the program that gets it.
func TestKubernetesManifests(t *testing.T) {
	k, objs := manifests(t)
	var all map[string]spec // nil with -short: the structure is checked all the same
	if !testing.Short() {
		all = specs(t)
	}
	if k.Namespace == "" {
		t.Error("kustomization.yaml sets no namespace")
	}
	secrets := map[string]map[string]bool{} // generated Secret → its keys
	for _, g := range k.SecretGenerator {
		secrets[g.Name] = map[string]bool{}
		for _, e := range g.Envs {
			// The real file is the operator's; its example names the keys.
			keys := readKeys(t, filepath.Join(k8sDir, e+".example"))
			for _, key := range keys {
				secrets[g.Name][key] = true
			}
			if ignored, _ := os.ReadFile(filepath.Join(k8sDir, ".gitignore")); !slices.Contains(strings.Fields(string(ignored)), e) {
				t.Errorf("kubernetes/.gitignore does not ignore %s: the passwords would be committed", e)
			}
		}
	}
	services := map[string]serviceSpec{}
	for _, o := range objs {
		if o.Kind == "Service" {
			services[o.Metadata.Name] = decodeSpec[serviceSpec](t, o)
		}
	}
	for _, o := range objs {
		switch o.Kind {
		case "StatefulSet", "Deployment":
			checkWorkload(t, o, decodeSpec[workloadSpec](t, o), objs, services, secrets, all)
		case "PodDisruptionBudget":
			if !selectsWorkload(objs, decodeSpec[workloadSpec](t, o).Selector.MatchLabels) {
				t.Errorf("%s: PodDisruptionBudget %s selects no pods", o.file, o.Metadata.Name)
			}
		case "Service":
			if !selectsWorkload(objs, services[o.Metadata.Name].Selector) {
				t.Errorf("%s: Service %s selects no pods", o.file, o.Metadata.Name)
			}
		}
	}
}

// TestKubernetesCluster: the workloads agree with each other and with the
// binaries: the relays, the control plane and the LoadBalancer lease the
// same TCP ports, every client reaches every NATS server as its role.
func TestKubernetesCluster(t *testing.T) {
	_, objs := manifests(t)
	all := specs(t)
	stages := readDockerfile(t)
	relaySet := find(objs, "StatefulSet", "tether-relay")
	cpSet := find(objs, "StatefulSet", "tether-controlplane")
	natsSet := find(objs, "StatefulSet", "tether-nats")
	if relaySet == nil || cpSet == nil || natsSet == nil {
		t.Fatal("want StatefulSets tether-relay, tether-controlplane and tether-nats")
	}
	relay, cp, nats := decodeSpec[workloadSpec](t, relaySet), decodeSpec[workloadSpec](t, cpSet), decodeSpec[workloadSpec](t, natsSet)
	if cp.Replicas == nil || *cp.Replicas != 1 {
		t.Errorf("the control plane must run exactly one replica (a second refuses to start)")
	}
	if err := controlplane.ValidRelayID(relaySet.Metadata.Name + "-0"); err != nil {
		t.Errorf("relay pods' names are their relay IDs: %v", err)
	}
	var natsURLs []string
	for i := range *nats.Replicas {
		natsURLs = append(natsURLs, fmt.Sprintf("nats://%s-%d.%s:4222", natsSet.Metadata.Name, i, nats.ServiceName))
	}
	env := func(w workloadSpec, stage string) map[string]string {
		c := w.Template.Spec.Containers[0]
		set := map[string]string{}
		for _, e := range c.Env {
			set[e.Name] = e.Value
		}
		return effective(all[binaries[stage]], stages[stage], set)
	}
	relayEnv, cpEnv := env(relay, "relay"), env(cp, "controlplane")
	for _, c := range []struct {
		name string
		env  map[string]string
		role natsperm.Role
		w    workloadSpec
	}{{"tether-relay", relayEnv, natsperm.Relay, relay}, {"tether-controlplane", cpEnv, natsperm.ControlPlane, cp}} {
		if got := strings.Split(c.env["TETHER_NATS_URL"], ","); !slices.Equal(got, natsURLs) {
			t.Errorf("%s: TETHER_NATS_URL %v, want every NATS server %v", c.name, got, natsURLs)
		}
		if c.env["TETHER_NATS_USER"] != c.role.User() {
			t.Errorf("%s: TETHER_NATS_USER %q, want %q", c.name, c.env["TETHER_NATS_USER"], c.role.User())
		}
		if file := c.env["TETHER_NATS_PASSWORD_FILE"]; filepath.Base(file) != c.role.User()+"-password" {
			t.Errorf("%s: TETHER_NATS_PASSWORD_FILE %q is not the Secret's %s-password", c.name, file, c.role.User())
		}
		if !mountedAt(c.w, c.env["TETHER_DATA_DIR"], true) {
			t.Errorf("%s: its data dir %s is not a volume claim of its own", c.name, c.env["TETHER_DATA_DIR"])
		}
	}
	for _, k := range []string{"TETHER_TCP_PORTS", "TETHER_DOMAIN"} {
		if relayEnv[k] != cpEnv[k] {
			t.Errorf("%s: the relays' %q differs from the control plane's %q", k, relayEnv[k], cpEnv[k])
		}
	}
	if relayEnv["TETHER_RELAY_ID"] != "$(POD_NAME)" {
		t.Errorf("TETHER_RELAY_ID %q: want $(POD_NAME), one ID per relay", relayEnv["TETHER_RELAY_ID"])
	}
	if peers, ok := findService(objs, relay.ServiceName); !ok || peers.ClusterIP != "None" || !peers.PublishNotReadyAddresses {
		t.Errorf("relays' serviceName %q: want a headless Service publishing not-ready addresses", relay.ServiceName)
	}

	// The public LoadBalancer: 80, 443 and every TCP lease port; never the
	// ops or cluster ports.
	lb, ok := findService(objs, "tether-relay")
	if !ok || lb.Type != "LoadBalancer" {
		t.Fatal("want a LoadBalancer Service tether-relay")
	}
	leases, err := controlplane.ParsePortRange(relayEnv["TETHER_TCP_PORTS"])
	if err != nil {
		t.Fatal(err)
	}
	c := relay.Template.Spec.Containers[0]
	portOf := func(name string) int {
		for _, p := range c.Ports {
			if p.Name == name {
				return p.ContainerPort
			}
		}
		n, _ := strconv.Atoi(name)
		return n
	}
	addrPort := func(k string) int {
		_, p, _ := strings.Cut(relayEnv[k], ":")
		n, _ := strconv.Atoi(p)
		return n
	}
	want := map[int]int{80: addrPort("TETHER_HTTP_ADDR"), 443: addrPort("TETHER_HTTPS_ADDR")}
	for p := int(leases.First); p <= int(leases.Last); p++ {
		want[p] = p
	}
	got := map[int]int{}
	for _, p := range lb.Ports {
		got[p.Port] = portOf(p.TargetPort)
	}
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Errorf("Service tether-relay ports (port→container port) %v, want 80, 443 and TETHER_TCP_PORTS %s: %v", got, leases, want)
	}
	if portOf("ops") != addrPort("TETHER_OPS_ADDR") || portOf("cluster") != addrPort("TETHER_CLUSTER_ADDR") {
		t.Errorf("relay container ports ops %d and cluster %d differ from TETHER_OPS_ADDR %q and TETHER_CLUSTER_ADDR %q",
			portOf("ops"), portOf("cluster"), relayEnv["TETHER_OPS_ADDR"], relayEnv["TETHER_CLUSTER_ADDR"])
	}
}

func findService(objs []*object, name string) (serviceSpec, bool) {
	for _, o := range objs {
		if o.Kind == "Service" && o.Metadata.Name == name {
			var s serviceSpec
			return s, o.Spec.Decode(&s) == nil
		}
	}
	return serviceSpec{}, false
}

// mountedAt reports whether path is a volume mount of the workload's
// first container, from a volume claim template if claim.
func mountedAt(w workloadSpec, path string, claim bool) bool {
	for _, m := range w.Template.Spec.Containers[0].VolumeMounts {
		if m.MountPath != path {
			continue
		}
		if !claim {
			return true
		}
		return slices.ContainsFunc(w.VolumeClaimTemplates, func(v struct{ Metadata struct{ Name string } }) bool { return v.Metadata.Name == m.Name })
	}
	return false
}

func selectsWorkload(objs []*object, selector map[string]string) bool {
	if len(selector) == 0 {
		return false
	}
	for _, o := range objs {
		if o.Kind != "StatefulSet" && o.Kind != "Deployment" {
			continue
		}
		var w workloadSpec
		if o.Spec.Decode(&w) != nil {
			continue
		}
		if matches(selector, w.Template.Metadata.Labels) {
			return true
		}
	}
	return false
}

func matches(selector, labels map[string]string) bool {
	for k, v := range selector {
		if labels[k] != v {
			return false
		}
	}
	return true
}

var varRef = regexp.MustCompile(`\$\(([A-Za-z_][A-Za-z0-9_]*)\)`)

// checkWorkload checks one workload's pods: labels and Services, volumes,
// Secrets, variables and probes.
func checkWorkload(t *testing.T, o *object, w workloadSpec, objs []*object, services map[string]serviceSpec, secrets map[string]map[string]bool, all map[string]spec) {
	t.Helper()
	where := fmt.Sprintf("%s %s/%s", o.file, o.Kind, o.Metadata.Name)
	if len(w.Selector.MatchLabels) == 0 || !matches(w.Selector.MatchLabels, w.Template.Metadata.Labels) {
		t.Errorf("%s: selector %v does not match its pods' labels %v", where, w.Selector.MatchLabels, w.Template.Metadata.Labels)
	}
	if o.Kind == "StatefulSet" {
		if s, ok := services[w.ServiceName]; !ok || s.ClusterIP != "None" {
			t.Errorf("%s: serviceName %q is no headless Service", where, w.ServiceName)
		}
	}
	if w.Template.Spec.EnableServiceLinks == nil || *w.Template.Spec.EnableServiceLinks {
		t.Errorf("%s: enableServiceLinks is not false: Kubernetes would set TETHER_RELAY_SERVICE_HOST and the like, warned about at every start", where)
	}
	volumes := map[string]bool{}
	secretFiles := map[string]string{} // volume → the Secret keys it holds, as files
	for _, v := range w.Template.Spec.Volumes {
		volumes[v.Name] = true
		if v.ConfigMap != nil && find(objs, "ConfigMap", v.ConfigMap.Name) == nil {
			t.Errorf("%s: volume %s: no ConfigMap %s", where, v.Name, v.ConfigMap.Name)
		}
		if v.Secret != nil {
			keys, ok := secrets[v.Secret.SecretName]
			if !ok {
				t.Errorf("%s: volume %s: no Secret %s is generated", where, v.Name, v.Secret.SecretName)
			}
			for _, it := range v.Secret.Items {
				if !keys[it.Key] {
					t.Errorf("%s: volume %s: Secret %s has no key %s", where, v.Name, v.Secret.SecretName, it.Key)
				}
				secretFiles[v.Name] += " " + it.Path
			}
		}
	}
	for _, v := range w.VolumeClaimTemplates {
		volumes[v.Metadata.Name] = true
	}
	labelled := matchingServices(services, w.Template.Metadata.Labels)
	for _, c := range slices.Concat(w.Template.Spec.InitContainers, w.Template.Spec.Containers) {
		where := where + " container " + c.Name
		binary := programOf(t, c.Image)
		mounts := map[string]string{} // mount path → volume
		for _, m := range c.VolumeMounts {
			if !volumes[m.Name] {
				t.Errorf("%s: mounts volume %s, which the pod does not have", where, m.Name)
			}
			mounts[m.MountPath] = m.Name
		}
		defined := map[string]bool{}
		var names []string
		for _, e := range c.Env {
			for _, ref := range varRef.FindAllStringSubmatch(e.Value, -1) {
				if !defined[ref[1]] {
					t.Errorf("%s: %s refers to $(%s), not defined before it", where, e.Name, ref[1])
				}
			}
			defined[e.Name] = true
			names = append(names, e.Name)
			if vf := e.ValueFrom; vf != nil && vf.SecretKeyRef != nil {
				if !secrets[vf.SecretKeyRef.Name][vf.SecretKeyRef.Key] {
					t.Errorf("%s: %s: Secret %s has no key %s", where, e.Name, vf.SecretKeyRef.Name, vf.SecretKeyRef.Key)
				}
			}
			if strings.HasSuffix(e.Name, "_FILE") {
				dir, file := filepath.Split(e.Value)
				vol, ok := mounts[filepath.Clean(dir)]
				if !ok || !slices.Contains(strings.Fields(secretFiles[vol]), file) {
					t.Errorf("%s: %s=%s is no file of a mounted Secret", where, e.Name, e.Value)
				}
			}
		}
		for _, a := range slices.Concat(c.Command, c.Args) {
			for _, ref := range varRef.FindAllStringSubmatch(a, -1) {
				if !defined[ref[1]] {
					t.Errorf("%s: argument %q refers to $(%s), which is not defined", where, a, ref[1])
				}
			}
		}
		switch {
		case binary == "nats":
			var tether []string
			for _, n := range names {
				if strings.HasPrefix(n, "TETHER_") {
					tether = append(tether, n)
				}
			}
			slices.Sort(tether)
			if want := natsConfVars(t); !slices.Equal(tether, want) {
				t.Errorf("%s: TETHER_* variables %v, want exactly the ones nats.conf reads: %v", where, tether, want)
			}
			if !slices.Contains(slices.Concat(c.Command, c.Args), "/etc/nats/nats.conf") || mounts["/etc/nats"] == "" {
				t.Errorf("%s: does not run on the ConfigMap's nats.conf at /etc/nats/nats.conf", where)
			}
		case binary != "" && all != nil:
			checkEnv(t, where, binary, all[binary], names)
		}
		ports := map[string]bool{}
		for _, p := range c.Ports {
			ports[p.Name] = true
			ports[strconv.Itoa(p.ContainerPort)] = true
		}
		for _, pr := range []*probe{c.ReadinessProbe, c.LivenessProbe} {
			if pr == nil {
				continue
			}
			port := ""
			if pr.HTTPGet != nil {
				port = pr.HTTPGet.Port
			} else if pr.TCPSocket != nil {
				port = pr.TCPSocket.Port
			}
			if !ports[port] {
				t.Errorf("%s: a probe uses port %q, which the container does not declare", where, port)
			}
		}
		for name, s := range labelled {
			for _, p := range s.Ports {
				if _, err := strconv.Atoi(p.TargetPort); err != nil && !ports[p.TargetPort] && len(w.Template.Spec.Containers) == 1 {
					t.Errorf("Service %s: targetPort %q is no port of %s", name, p.TargetPort, where)
				}
			}
		}
	}
}

func matchingServices(services map[string]serviceSpec, labels map[string]string) map[string]serviceSpec {
	out := map[string]serviceSpec{}
	for name, s := range services {
		if len(s.Selector) > 0 && matches(s.Selector, labels) {
			out[name] = s
		}
	}
	return out
}

// programOf tells what an image runs: a Tether binary, NATS (of go.mod's
// version), or a helper ("").
func programOf(t *testing.T, image string) string {
	t.Helper()
	name, tag, _ := strings.Cut(image, ":")
	for _, b := range binaries {
		if name == b {
			return b
		}
	}
	if name == "nats" {
		if v := natsVersion(t); tag != v {
			t.Errorf("image %s: want nats:%s, the nats-server of go.mod", image, v)
		}
		return "nats"
	}
	return ""
}

// readKeys reads the keys of an env file (KEY=value lines).
func readKeys(t *testing.T, path string) []string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for line := range strings.Lines(string(b)) {
		line = strings.TrimSpace(line)
		if line == "" || strings.HasPrefix(line, "#") {
			continue
		}
		k, _, _ := strings.Cut(line, "=")
		keys = append(keys, k)
	}
	return keys
}
