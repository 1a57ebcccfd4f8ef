package controlplane

import (
	"context"
	"io"
	"time"
)

// Release is a signed agent release as the operator published it: the
// manifest exactly as signed (package firmware/release describes it) and
// its minisign signature file. Agents verify it themselves; the control
// plane and the relays only carry it.
type Release struct {
	Version   string    `json:"version"`
	Manifest  []byte    `json:"manifest"`
	Signature []byte    `json:"signature"`
	CreatedAt time.Time `json:"created_at"`
}

// UpdateReport is one update status an agent reported (frames.UpdateStatus)
// with where and when.
type UpdateReport struct {
	DeviceID string    `json:"device_id"`
	Version  string    `json:"version"`
	State    string    `json:"state"` // a frames.Update* state
	Reason   string    `json:"reason,omitempty"`
	Relay    string    `json:"relay"`
	At       time.Time `json:"at"`
}

// Releases is what a relay uses to update agents: which release a device
// should run, the binaries, and where agents report progress. The control
// plane is the authority on rollouts; natsapi.Client implements this over
// NATS.
type Releases interface {
	// Offer returns the release the device should be offered now, given
	// the version its agent runs; ok is false when there is none (no
	// rollout, the device is not selected, or it runs that version).
	Offer(ctx context.Context, deviceID, agentVersion string) (rel Release, ok bool, err error)
	// Latest returns the newest published release (what install.sh
	// installs); ok is false when none was published.
	Latest(ctx context.Context) (rel Release, ok bool, err error)
	// OpenArtifact opens the binary of a release for one architecture (a
	// manifest key such as "arm64"), positioned at offset, and returns its
	// total size.
	OpenArtifact(ctx context.Context, version, arch string, offset int64) (io.ReadCloser, int64, error)
	// ReportUpdate records an agent's update status.
	ReportUpdate(ctx context.Context, r UpdateReport) error
}
