package controlplane

import "time"

// NATS subjects of releases and rollouts (relay/cluster.md "Releases").
// Relays ask; only the control plane answers. Nothing on NATS publishes a
// release or changes a rollout: that is the admin API's alone.
const (
	SubjectReleasePlan     = SubjectPrefix + "release-plan"     // {} → RolloutPlan
	SubjectReleaseLatest   = SubjectPrefix + "release-latest"   // {} → LatestResponse
	SubjectReleaseGet      = SubjectPrefix + "release-get"      // version (a JSON string) → Release
	SubjectReleaseArtifact = SubjectPrefix + "release-artifact" // ArtifactRequest → ArtifactChunk
	SubjectReleaseReport   = SubjectPrefix + "release-report"   // UpdateReport → {}
	// SubjectReleaseEvents carries ReleaseEvent, published by the control
	// plane when a release is complete or a rollout changes: relays drop
	// their cached RolloutPlan.
	SubjectReleaseEvents = "tether.events.release"
)

// MaxArtifactChunk bounds one ArtifactChunk's data.
const MaxArtifactChunk = 512 << 10

// Rollout states.
const (
	RolloutActive  = "active"  // devices chosen are offered the release
	RolloutPaused  = "paused"  // nothing is offered until resumed
	RolloutAborted = "aborted" // nothing is offered again; devices keep what they run
)

// Rollout is the staged rollout of one release: the control plane has at
// most one current rollout (starting another replaces it).
type Rollout struct {
	Version string `json:"version"`
	// Labels select the devices: a device must carry each. Empty: every
	// device.
	Labels map[string]string `json:"labels,omitempty"`
	// Percent of the selected devices are offered the release (release.Choose).
	Percent   int       `json:"percent"`
	State     string    `json:"state"` // a Rollout* state
	StartedAt time.Time `json:"started_at"`
	UpdatedAt time.Time `json:"updated_at"`
}

// ReleaseRecord is a release as the control plane keeps it.
type ReleaseRecord struct {
	Release
	// PublishedAt is when the manifest was accepted.
	PublishedAt time.Time `json:"published_at"`
	// Complete is true once every artifact of the manifest was uploaded
	// and checked; only complete releases are offered or installed.
	Complete bool `json:"complete"`
	// Installable is true once a rollout of the release reached 100% of
	// the fleet (no labels), until such a rollout is aborted: new devices
	// (install.sh) get the newest installable release, so that publishing
	// alone reaches no device.
	Installable bool `json:"installable,omitempty"`
}

// ReleaseInfo describes a release in listings.
type ReleaseInfo struct {
	Version     string    `json:"version"`
	MinVersion  string    `json:"min_version,omitempty"`
	Floor       string    `json:"floor,omitempty"`
	CreatedAt   time.Time `json:"created_at"`
	PublishedAt time.Time `json:"published_at"`
	Arches      []string  `json:"arches"`
	// Missing lists the architectures whose binary was not uploaded yet.
	Missing  []string `json:"missing,omitempty"`
	Complete bool     `json:"complete"`
}

// RolloutPlan is what relays cache to answer offers: the current rollout
// and its release, and the devices to offer it to now (sorted IDs:
// chosen, not yet reported refused or rolled back). Rollout is nil when
// there is none; Devices is empty unless the rollout is active.
type RolloutPlan struct {
	Rollout *Rollout `json:"rollout,omitempty"`
	Release *Release `json:"release,omitempty"`
	Devices []string `json:"devices,omitempty"`
}

// LatestResponse answers SubjectReleaseLatest: OK is false when no
// release is complete.
type LatestResponse struct {
	Release Release `json:"release"`
	OK      bool    `json:"ok"`
}

// ArtifactRequest asks for a piece of a release's binary.
type ArtifactRequest struct {
	Version string `json:"version"`
	Arch    string `json:"arch"`
	Offset  int64  `json:"offset"`
	// Length is at most MaxArtifactChunk; zero means MaxArtifactChunk.
	Length int `json:"length,omitempty"`
}

// ArtifactChunk answers ArtifactRequest: the bytes from its Offset (fewer
// than asked only at the end of the file) and the file's size.
type ArtifactChunk struct {
	Data []byte `json:"data"`
	Size int64  `json:"size"`
}

// ReleaseEvent kinds.
const (
	ReleaseEventPublished = "published" // a release became complete
	ReleaseEventRollout   = "rollout"   // the current rollout changed
)

// ReleaseEvent is published on SubjectReleaseEvents.
type ReleaseEvent struct {
	Kind    string `json:"kind"`
	Version string `json:"version"`
}

// Update states of devices in a rollout's status, besides the
// frames.Update* states an agent reports.
const (
	UpdatePending     = "pending"      // chosen, nothing reported yet
	UpdateNotSelected = "not-selected" // matches the labels, not chosen at this percent
	UpdateUpToDate    = "up-to-date"   // runs the version (or newer) without having reported on it
	UpdateDevBuild    = "dev-build"    // runs a development build: never updated over the air
)

// DeviceUpdate is one device's line in a rollout's status.
type DeviceUpdate struct {
	DeviceID     string    `json:"device_id"`
	Name         string    `json:"name"`
	AgentVersion string    `json:"agent_version,omitempty"`
	Online       bool      `json:"online"`
	State        string    `json:"state"` // a frames.Update* or Update* state above
	Reason       string    `json:"reason,omitempty"`
	At           time.Time `json:"at,omitzero"` // of the report
}

// RolloutStatus is the current rollout and where its devices are.
type RolloutStatus struct {
	Rollout *Rollout `json:"rollout,omitempty"`
	// Matching counts the devices the labels select (not revoked);
	// Chosen those offered at the current percent.
	Matching int `json:"matching"`
	Chosen   int `json:"chosen"`
	// Versions counts the matching devices by agent version; States by
	// state.
	Versions map[string]int `json:"versions"`
	States   map[string]int `json:"states"`
	Devices  []DeviceUpdate `json:"devices"`
}
