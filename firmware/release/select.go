package release

import (
	"cmp"
	"crypto/sha256"
	"encoding/binary"
	"slices"
)

// score places a device on [0, 2^64) for a release: uniform, fixed per
// (device, version), different for each version (so that the same devices
// are not always the first to take a release).
func score(deviceID, version string) uint64 {
	h := sha256.New()
	h.Write([]byte("tether rollout\x00"))
	h.Write([]byte(version))
	h.Write([]byte{0})
	h.Write([]byte(deviceID))
	var sum [sha256.Size]byte
	return binary.BigEndian.Uint64(h.Sum(sum[:0]))
}

// Selected reports whether a rollout of version to percent of the fleet
// reaches the device, without knowing the fleet: the device is in when
// its score falls in the first percent of the range. It is deterministic
// per device and never deselects a device when percent rises, but only a
// large fleet gets close to percent (it is a coin toss per device): the
// control plane, which knows the fleet, uses Choose, which is exact.
// percent ≤ 0 reaches none, ≥ 100 all.
func Selected(deviceID, version string, percent int) bool {
	switch {
	case percent <= 0:
		return false
	case percent >= 100:
		return true
	}
	// score < percent% of 2^64, without overflow: compare the top bits.
	return score(deviceID, version)>>32 < uint64(percent)*(1<<32)/100
}

// Quota is how many of n devices a rollout to percent reaches: percent
// of n rounded half up, at least one when percent > 0 and n > 0.
func Quota(n, percent int) int {
	switch {
	case n <= 0 || percent <= 0:
		return 0
	case percent >= 100:
		return n
	}
	return max(1, (n*percent+50)/100)
}

// Choose returns the devices of ids a rollout of version to percent
// reaches: the Quota(len(ids), percent) devices of lowest score. For a given set of devices it is deterministic,
// exact, and a larger percent chooses a superset. The control plane
// chooses among the devices a rollout's labels match; sticky lists
// devices already reached (they reported on this version, or run it),
// which stay chosen and count toward the quota (they come first in the
// result; nil means none).
func Choose(ids []string, version string, percent int, sticky func(id string) bool) []string {
	type scored struct {
		id    string
		score uint64
	}
	all := make([]scored, 0, len(ids))
	for _, id := range ids {
		all = append(all, scored{id, score(id, version)})
	}
	slices.SortFunc(all, func(a, b scored) int {
		return cmp.Or(cmp.Compare(a.score, b.score), cmp.Compare(a.id, b.id))
	})
	all = slices.CompactFunc(all, func(a, b scored) bool { return a.id == b.id })
	quota := Quota(len(all), percent)
	var out []string
	if sticky != nil {
		for _, s := range all {
			if sticky(s.id) {
				out = append(out, s.id)
			}
		}
	}
	for _, s := range all {
		if len(out) >= quota {
			break
		}
		if sticky == nil || !sticky(s.id) {
			out = append(out, s.id)
		}
	}
	return out
}
