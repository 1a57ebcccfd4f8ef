package boltstore

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"strings"

	"github.com/tetherfleet/tether/controlplane"
	bolt "go.etcd.io/bbolt"
)

// AddRelease records a published release. Adding a version again with
// the same manifest and signature succeeds and changes nothing (a publish
// that is resumed); with anything else it is a KindConflict: a version is
// never replaced.
func (s *Store) AddRelease(ctx context.Context, rec controlplane.ReleaseRecord) (controlplane.ReleaseRecord, error) {
	var out controlplane.ReleaseRecord
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketReleases)
		var old controlplane.ReleaseRecord
		if ok, err := getJSON(b, []byte(rec.Version), &old); err != nil {
			return err
		} else if ok {
			if !bytes.Equal(old.Manifest, rec.Manifest) || !bytes.Equal(old.Signature, rec.Signature) {
				return controlplane.Errorf(controlplane.KindConflict, "release %s was already published with another manifest or signature: a version is never replaced, publish a new version", rec.Version)
			}
			out = old
			return nil
		}
		out = rec
		return putJSON(b, []byte(rec.Version), rec)
	})
	return out, wrap("add release", err)
}

// CompleteRelease marks a release complete: all its binaries are stored.
func (s *Store) CompleteRelease(ctx context.Context, version string) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketReleases)
		var rec controlplane.ReleaseRecord
		if ok, err := getJSON(b, []byte(version), &rec); err != nil {
			return err
		} else if !ok {
			return controlplane.Errorf(controlplane.KindNotFound, "no release %s", version)
		}
		rec.Complete = true
		return putJSON(b, []byte(version), rec)
	})
	return wrap("complete release", err)
}

// SetInstallable marks a release installable or not (ReleaseRecord).
func (s *Store) SetInstallable(ctx context.Context, version string, installable bool) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		b := tx.Bucket(bucketReleases)
		var rec controlplane.ReleaseRecord
		if ok, err := getJSON(b, []byte(version), &rec); err != nil || !ok {
			return err
		}
		rec.Installable = installable
		return putJSON(b, []byte(version), rec)
	})
	return wrap("mark release installable", err)
}

// Release returns a published release.
func (s *Store) Release(ctx context.Context, version string) (controlplane.ReleaseRecord, error) {
	var rec controlplane.ReleaseRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		ok, err := getJSON(tx.Bucket(bucketReleases), []byte(version), &rec)
		if err == nil && !ok {
			err = controlplane.Errorf(controlplane.KindNotFound, "no release %s", version)
		}
		return err
	})
	return rec, wrap("read release", err)
}

// Releases lists the published releases (in key order; callers sort by
// version).
func (s *Store) Releases(ctx context.Context) ([]controlplane.ReleaseRecord, error) {
	var out []controlplane.ReleaseRecord
	err := s.db.View(func(tx *bolt.Tx) error {
		return forEachJSON(tx.Bucket(bucketReleases), func(r controlplane.ReleaseRecord) { out = append(out, r) })
	})
	return out, wrap("list releases", err)
}

var keyCurrentRollout = []byte("current")

// SetRollout records the current rollout.
func (s *Store) SetRollout(ctx context.Context, r controlplane.Rollout) error {
	err := s.db.Update(func(tx *bolt.Tx) error {
		return putJSON(tx.Bucket(bucketRollouts), keyCurrentRollout, r)
	})
	return wrap("record rollout", err)
}

// Rollout returns the current rollout; ok is false when none was started.
func (s *Store) Rollout(ctx context.Context) (r controlplane.Rollout, ok bool, err error) {
	err = s.db.View(func(tx *bolt.Tx) error {
		ok, err = getJSON(tx.Bucket(bucketRollouts), keyCurrentRollout, &r)
		return err
	})
	return r, ok, wrap("read rollout", err)
}

func updateKey(version, deviceID string) []byte { return []byte(version + "\x00" + deviceID) }

// PutUpdateReport keeps a device's latest report on a release. The
// device and the release must exist (KindNotFound): a relay cannot grow
// the store with reports on anything else.
func (s *Store) PutUpdateReport(ctx context.Context, r controlplane.UpdateReport) error {
	err := s.db.Batch(func(tx *bolt.Tx) error {
		if tx.Bucket(bucketDevices).Get([]byte(r.DeviceID)) == nil {
			return controlplane.Errorf(controlplane.KindNotFound, "update report of unknown device %q", r.DeviceID)
		}
		if tx.Bucket(bucketReleases).Get([]byte(r.Version)) == nil {
			return controlplane.Errorf(controlplane.KindNotFound, "update report on unpublished release %q", r.Version)
		}
		return putJSON(tx.Bucket(bucketUpdates), updateKey(r.Version, r.DeviceID), r)
	})
	return wrap("record update report", err)
}

// UpdateReports returns the latest report of each device on a release,
// by device ID.
func (s *Store) UpdateReports(ctx context.Context, version string) (map[string]controlplane.UpdateReport, error) {
	out := map[string]controlplane.UpdateReport{}
	prefix := updateKey(version, "")
	err := s.db.View(func(tx *bolt.Tx) error {
		c := tx.Bucket(bucketUpdates).Cursor()
		for k, v := c.Seek(prefix); k != nil && bytes.HasPrefix(k, prefix); k, v = c.Next() {
			var r controlplane.UpdateReport
			if err := json.Unmarshal(v, &r); err != nil {
				return fmt.Errorf("decode update report %q: %w", k, err)
			}
			out[strings.TrimPrefix(string(k), string(prefix))] = r
		}
		return nil
	})
	return out, wrap("read update reports", err)
}
