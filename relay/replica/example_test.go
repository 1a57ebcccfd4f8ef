package replica_test

import (
	"crypto/ed25519"
	"fmt"
	"os"
	"path/filepath"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/relay/replica"
)

func Example() {
	dir, _ := os.MkdirTemp("", "replica")
	defer os.RemoveAll(dir)
	r, err := replica.Open(replica.Config{Path: filepath.Join(dir, "relay.db")})
	if err != nil {
		panic(err)
	}
	defer r.Close()

	pub, _, _ := ed25519.GenerateKey(nil)
	id := frames.DeviceID(pub)
	// A snapshot of one page, then the event after it.
	err = r.ApplySnapshot(controlplane.SnapshotResponse{Epoch: "7f3a", Seq: 41, Devices: []controlplane.DeviceRecord{{
		ID: id, Name: "pi01", PublicKey: pub,
		Leases: []controlplane.Lease{{Hostname: "web-pi01", Service: "web", Proto: controlplane.ProtoHTTP}},
	}}}, true)
	if err != nil {
		panic(err)
	}
	res, err := r.Apply(controlplane.DeviceEvent{Epoch: "7f3a", Seq: 42, Kind: controlplane.EventSession, DeviceID: id, Generation: 3, RelayID: "relay-b"})
	if err != nil {
		panic(err)
	}
	fmt.Printf("%+v\n", res)

	rec, lease, _ := r.ByHostname("web-pi01")
	fmt.Println(rec.Name, lease.Service, "online on", lease.Relay)

	// The control plane is away: the device reconnects here.
	_, gen, err := r.Admit(pub)
	fmt.Println("provisional generation", gen, err)
	// Output:
	// {Applied:1 Ignored:0 NeedSnapshot:false}
	// pi01 web online on relay-b
	// provisional generation 4 <nil>
}
