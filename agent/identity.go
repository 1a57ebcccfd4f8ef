package agent

import (
	"bytes"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"time"

	"github.com/tetherfleet/tether/frames"
	"github.com/tetherfleet/tether/frames/secretfile"
)

// identity is the device's key and enrollment record.
type identity struct {
	key      ed25519.PrivateKey
	pub      [32]byte
	DeviceID string `json:"device_id"`
	Name     string `json:"name"`
}

const (
	keyFile    = "device.key"  // PKCS#8 PEM, mode 0600
	recordFile = "device.json" // {"device_id", "name"} once enrolled
)

// EnrollError is a refusal of enrollment by the relay: retrying with the
// same token would not help.
type EnrollError struct {
	Status  int
	Message string
}

func (e *EnrollError) Error() string {
	return fmt.Sprintf("enrollment refused (HTTP %d): %s", e.Status, e.Message)
}

// ErrNotEnrolled means the device has no enrollment and no token to get one.
var ErrNotEnrolled = errors.New("device is not enrolled: set TETHER_ENROLL_TOKEN for its first start")

// loadIdentity returns the enrolled identity in the state dir, enrolling
// with the token first if needed. Network failures are retried with
// backoff until ctx ends; a refusal is returned at once.
func (a *Agent) loadIdentity(ctx context.Context) (*identity, error) {
	dir := a.cfg.StateDir
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("create state dir: %w", err)
	}
	id, err := loadOrCreateKey(filepath.Join(dir, keyFile))
	if err != nil {
		return nil, err
	}
	rec, err := os.ReadFile(filepath.Join(dir, recordFile))
	if err == nil {
		if err := json.Unmarshal(rec, id); err != nil {
			return nil, fmt.Errorf("read %s: %w", recordFile, err)
		}
		if id.DeviceID != frames.DeviceID(id.pub[:]) {
			return nil, fmt.Errorf("%s belongs to another key (%s); remove it to enroll again", recordFile, id.DeviceID)
		}
		return id, nil
	}
	if !errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("read enrollment record: %w", err)
	}
	if a.cfg.EnrollToken == "" {
		return nil, ErrNotEnrolled
	}
	// A new device has no lease a '-' service name could keep: enrolling
	// would use a token up for a device whose registration is refused.
	for _, s := range a.cfg.Services {
		if frames.LegacyServiceName(s.Name) {
			return nil, fmt.Errorf("%w; service %q: a name with '-' only keeps the hostname it already holds, and a new device holds none: rename it (no '-')", ErrNotEnrolled, s.Name)
		}
	}
	name, isDefault := a.cfg.DeviceName, false
	if name == "" {
		name, isDefault = DefaultDeviceName(), true
	}
	req := frames.EnrollRequest{Token: a.cfg.EnrollToken, EnrollDevice: frames.EnrollDevice{
		PublicKey: id.pub[:], Name: name, NameIsDefault: isDefault, AgentVersion: a.cfg.Version}}
	bo := a.newBackoff()
	for attempt := 0; ; attempt++ {
		url := enrollURL(a.cfg.RelayURLs[attempt%len(a.cfg.RelayURLs)])
		resp, err := a.enroll(ctx, url, req)
		var refused *EnrollError
		if errors.As(err, &refused) {
			return nil, err
		}
		if err == nil {
			err = checkEnrollment(resp, id)
		}
		if err == nil {
			id.DeviceID, id.Name = resp.DeviceID, resp.Name
			data, _ := json.MarshalIndent(id, "", "  ")
			if err := writeFileAtomic(filepath.Join(dir, recordFile), data, 0o600); err != nil {
				return nil, fmt.Errorf("save enrollment record: %w", err)
			}
			a.log.Info("device enrolled", "device", id.Name, "device_id", id.DeviceID)
			return id, nil
		}
		wait := bo.next()
		a.log.Warn("enrollment failed; retrying", "relay", url, "err", err, "retry_in", wait)
		if err := sleepCtx(ctx, wait); err != nil {
			return nil, err
		}
	}
}

// enrollAnswerError classifies a failed enrollment answer. Only the
// relay's own refusal (a 4xx with its JSON error body, other than 408, 425
// and 429) is final (*EnrollError); a redirect is never followed (the token
// goes to the relay itself only), and anything else (a proxy's or load
// balancer's page, a 5xx) is retried.
func enrollAnswerError(resp *http.Response, data []byte) error {
	if loc := resp.Header.Get("Location"); resp.StatusCode >= 300 && resp.StatusCode < 400 {
		return fmt.Errorf("relay answered enrollment with a redirect (HTTP %d to %q), which the agent does not follow: set TETHER_RELAY_URL to the relay itself", resp.StatusCode, loc)
	}
	var e frames.HTTPError
	fromRelay := json.Unmarshal(data, &e) == nil && e.Error != ""
	switch resp.StatusCode {
	case http.StatusRequestTimeout, http.StatusTooEarly, http.StatusTooManyRequests:
		fromRelay = false
	}
	if fromRelay && resp.StatusCode >= 400 && resp.StatusCode < 500 {
		return &EnrollError{Status: resp.StatusCode, Message: e.Error}
	}
	if e.Error == "" {
		e.Error = http.StatusText(resp.StatusCode)
	}
	return fmt.Errorf("relay answered enrollment with HTTP %d: %q", resp.StatusCode, e.Error)
}

// checkEnrollment refuses an answer that does not describe this device:
// the ID must derive from its key and the name follow the grammar.
func checkEnrollment(resp frames.EnrollResponse, id *identity) error {
	if want := frames.DeviceID(id.pub[:]); resp.DeviceID != want {
		return fmt.Errorf("relay answered enrollment with device ID %q, not this key's %s", resp.DeviceID, want)
	}
	if err := frames.ValidDeviceName(resp.Name); err != nil {
		return fmt.Errorf("relay answered enrollment with a bad name: %w", err)
	}
	return nil
}

// maxEnrollAnswer bounds what the agent reads of an enrollment answer.
const maxEnrollAnswer = 64 << 10

// enroll POSTs the enrollment request to one relay. A 4xx answer other
// than 429 is a refusal (*EnrollError); anything else may be retried.
func (a *Agent) enroll(ctx context.Context, url string, req frames.EnrollRequest) (frames.EnrollResponse, error) {
	var out frames.EnrollResponse
	body, err := json.Marshal(req)
	if err != nil {
		return out, fmt.Errorf("encode enrollment request: %w", err)
	}
	ctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	hreq, err := http.NewRequestWithContext(ctx, http.MethodPost, url, bytes.NewReader(body))
	if err != nil {
		return out, fmt.Errorf("enrollment request: %w", err)
	}
	hreq.Header.Set("Content-Type", "application/json")
	resp, err := a.dialOptions().HTTPClient().Do(hreq)
	if err != nil {
		return out, fmt.Errorf("enroll at %s: %w", url, err)
	}
	defer resp.Body.Close()
	data, err := io.ReadAll(io.LimitReader(resp.Body, maxEnrollAnswer))
	if err != nil {
		return out, fmt.Errorf("read enrollment answer: %w", err)
	}
	if resp.StatusCode != http.StatusOK {
		return out, enrollAnswerError(resp, data)
	}
	if len(data) == maxEnrollAnswer {
		return out, fmt.Errorf("enrollment answer is larger than %d bytes", maxEnrollAnswer)
	}
	if err := json.Unmarshal(data, &out); err != nil {
		return out, fmt.Errorf("decode enrollment answer: %w", err)
	}
	return out, nil
}

// loadOrCreateKey loads the device key, generating it (mode 0600) on first
// use. A key others may read is refused (secretfile).
func loadOrCreateKey(path string) (*identity, error) {
	data, err := secretfile.Read(path)
	if errors.Is(err, fs.ErrNotExist) {
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			return nil, err
		}
		der, err := x509.MarshalPKCS8PrivateKey(priv)
		if err != nil {
			return nil, err
		}
		data = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
		if err := secretfile.Write(path, data); err != nil {
			return nil, fmt.Errorf("save device key: %w", err)
		}
	} else if err != nil {
		return nil, fmt.Errorf("read device key: %w", err)
	}
	block, _ := pem.Decode(data)
	if block == nil {
		return nil, fmt.Errorf("device key %s is not PEM", path)
	}
	k, err := x509.ParsePKCS8PrivateKey(block.Bytes)
	if err != nil {
		return nil, fmt.Errorf("parse device key %s: %w", path, err)
	}
	priv, ok := k.(ed25519.PrivateKey)
	if !ok {
		return nil, fmt.Errorf("device key %s is not ed25519", path)
	}
	id := &identity{key: priv}
	copy(id.pub[:], priv.Public().(ed25519.PublicKey))
	return id, nil
}

// writeFileAtomic writes data to a temporary file, syncs it and renames it
// over path, so a crash leaves the old file or the new one, never half.
func writeFileAtomic(path string, data []byte, perm os.FileMode) error {
	f, err := os.CreateTemp(filepath.Dir(path), filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	if err := f.Chmod(perm); err != nil {
		f.Close()
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	return os.Rename(f.Name(), path)
}
