package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

func TestProvisionWritesTetherEnv(t *testing.T) {
	boot := t.TempDir()
	var out, errOut bytes.Buffer
	err := run(t.Context(), []string{"provision", "--token", "tth_abc", "--relay", "https://relay.example.com:8443/",
		"--services", "web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22", "--name", "pi01", "--boot", boot}, &out, &errOut)
	if err != nil {
		t.Fatalf("%v\n%s", err, errOut.String())
	}
	b, err := os.ReadFile(filepath.Join(boot, "tether.env"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{
		"\nTETHER_RELAY_URL=wss://relay.example.com:8443\n",
		"\nTETHER_ENROLL_TOKEN=tth_abc\n",
		"\nTETHER_SERVICES=web=http://127.0.0.1:8080,ssh=tcp://127.0.0.1:22\n",
		"\nTETHER_DEVICE_NAME=pi01\n",
	} {
		if !strings.Contains(string(b), want) {
			t.Errorf("tether.env lacks %q:\n%s", want, b)
		}
	}
	if strings.Contains(string(b), "RELEASE_KEYS") {
		t.Errorf("release keys written though none given:\n%s", b)
	}
	if !strings.Contains(out.String(), "wrote "+filepath.Join(boot, "tether.env")) {
		t.Errorf("output: %s", out.String())
	}
}

func TestProvisionRefuses(t *testing.T) {
	boot := t.TempDir()
	good := map[string]string{"--token": "tth_abc", "--relay": "wss://r.example.com", "--services": "web=http://127.0.0.1:80", "--boot": boot}
	for name, bad := range map[string][2]string{
		"token":         {"--token", "abc"},
		"relay scheme":  {"--relay", "http://r.example.com"},
		"service name":  {"--services", "web-ui=http://127.0.0.1:80"},
		"service proto": {"--services", "web=udp://127.0.0.1:80"},
		"no port":       {"--services", "web=http://127.0.0.1"},
		"device name":   {"--name", "Pi 01"},
		"quote":         {"--release-keys", "RW'x"},
		"release keys":  {"--release-keys", "garbage"},
		"boot":          {"--boot", filepath.Join(boot, "missing")},
	} {
		args := []string{"provision"}
		for k, v := range good {
			if k != bad[0] {
				args = append(args, k, v)
			}
		}
		args = append(args, bad[0], bad[1])
		var out, errOut bytes.Buffer
		if err := run(t.Context(), args, &out, &errOut); err == nil {
			t.Errorf("%s: accepted", name)
		}
	}
	if _, err := os.Stat(filepath.Join(boot, "tether.env")); err == nil {
		t.Error("a refused provision wrote tether.env")
	}
}
