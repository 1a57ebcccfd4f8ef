package replica

import (
	"bufio"
	"fmt"
	"log/slog"
	"math/rand/v2"
	"os"
	"os/exec"
	"slices"
	"testing"

	"github.com/tetherfleet/tether/controlplane"
)

// The child of TestKill9 replays a deterministic history: epoch k starts
// with a snapshot (in pages) of devices killFirst(k)…killDevices-1, then
// killEvents events, each giving device seq%killDevices new names.
const (
	killDevices = 7
	killEvents  = 30
	killAcks    = 150
)

func killFirst(k int) int { return k % 2 } // odd epochs lack device 0: snapshots remove devices

func killName(i int) string { return fmt.Sprint("k", i) }

// killModel is the state after seq of epoch k: device name → leases.
func killModel(k int, seq uint64) map[string][]controlplane.Lease {
	m := map[string][]controlplane.Lease{}
	for i := killFirst(k); i < killDevices; i++ {
		m[killName(i)] = []controlplane.Lease{web(fmt.Sprintf("w%d-e%d", i, k)), ssh(uint16(1000 + i))}
	}
	for s := uint64(1); s <= seq; s++ {
		i := int(s % killDevices)
		if _, ok := m[killName(i)]; ok {
			m[killName(i)] = []controlplane.Lease{web(fmt.Sprintf("w%d-e%d-s%d", i, k, s)), ssh(uint16(2000 + s))}
		}
	}
	return m
}

// TestKill9 kills a child process that applies snapshots and events as fast
// as it can, then checks that the file passes bbolt's checks and holds
// exactly the state of the (epoch, seq) it records, no older than the
// child's last acknowledged write.
func TestKill9(t *testing.T) {
	if path := os.Getenv("REPLICA_KILL_CHILD"); path != "" {
		killChild(path)
		return
	}
	if testing.Short() {
		t.Skip("starts a child process")
	}
	path := tempPath(t)
	cmd := exec.Command(os.Args[0], "-test.run=^TestKill9$")
	cmd.Env = append(os.Environ(), "REPLICA_KILL_CHILD="+path)
	cmd.Stderr = t.Output()
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	sc := bufio.NewScanner(out)
	acks, ackedEpoch, ackedSeq := 0, 0, uint64(0)
	stop := killAcks + rand.IntN(2*killEvents) // anywhere in an epoch, its snapshot included
	for acks < stop && sc.Scan() {
		if _, err := fmt.Sscanf(sc.Text(), "acked e%d %d", &ackedEpoch, &ackedSeq); err == nil {
			acks++
		}
	}
	cmd.Process.Kill() // SIGKILL while it keeps writing
	cmd.Wait()
	if acks < stop {
		t.Fatalf("the child acknowledged %d writes", acks)
	}

	r := mustOpen(t, path)
	if err := r.check(); err != nil {
		t.Fatalf("consistency check: %v", err)
	}
	epoch, seq := r.Epoch()
	var k int
	if _, err := fmt.Sscanf(epoch, "e%d", &k); err != nil {
		t.Fatalf("epoch %q", epoch)
	}
	if k < ackedEpoch || k == ackedEpoch && seq < ackedSeq {
		t.Fatalf("file at e%d seq %d, the child acknowledged e%d seq %d", k, seq, ackedEpoch, ackedSeq)
	}
	t.Logf("killed after e%d seq %d acknowledged; the file is at e%d seq %d", ackedEpoch, ackedSeq, k, seq)
	want := killModel(k, seq)
	if st := r.Stats(); st.Devices != len(want) {
		t.Fatalf("%d devices, want %d", st.Devices, len(want))
	}
	var ports []uint16
	for name, ls := range want {
		d := mustDevice(t, r, name)
		if !slices.EqualFunc(d.Leases, ls, func(a, b controlplane.Lease) bool { return a.Hostname == b.Hostname && a.Port == b.Port }) {
			t.Fatalf("%s holds %+v, want %+v", name, d.Leases, ls)
		}
		wantHost(t, r, ls[0].Hostname, name)
		wantPort(t, r, ls[1].Port, name)
		ports = append(ports, ls[1].Port)
	}
	slices.Sort(ports)
	wantPorts(t, r, ports...)
	checkInvariants(t, r)
}

// killChild writes the history of killModel until it is killed, printing
// what each write acknowledged.
func killChild(path string) {
	r, err := Open(Config{Path: path, Logger: slog.New(slog.DiscardHandler)})
	if err != nil {
		panic(err)
	}
	for k := 1; ; k++ {
		epoch := fmt.Sprint("e", k)
		var recs []controlplane.DeviceRecord
		for name, ls := range killModel(k, 0) {
			recs = append(recs, dev(name, ls...))
		}
		for i, page := range pages(epoch, 0, 3, recs) {
			if err := r.ApplySnapshot(page, i == 0); err != nil {
				panic(err)
			}
		}
		fmt.Printf("acked %s 0\n", epoch)
		for s := uint64(1); s <= killEvents; s++ {
			i := int(s % killDevices)
			ev := leases(killName(i), web(fmt.Sprintf("w%d-e%d-s%d", i, k, s)), ssh(uint16(2000+s)))
			ev.Epoch, ev.Seq = epoch, s
			if res, err := r.Apply(ev); err != nil || res.Applied != 1 {
				panic(fmt.Sprint(res, err))
			}
			fmt.Printf("acked %s %d\n", epoch, s)
		}
	}
}
