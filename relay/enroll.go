package relay

import (
	"encoding/json"
	"net/http"
	"strings"

	"github.com/tetherfleet/tether/controlplane"
	"github.com/tetherfleet/tether/frames"
)

// serveEnroll handles POST /_tether/enroll: it passes the agent's token and
// public key to the control plane and answers with the device's identity.
// The token never appears in a log line or an answer.
func (s *Server) serveEnroll(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		writeJSON(w, http.StatusMethodNotAllowed, frames.HTTPError{Error: "use POST"})
		return
	}
	var req frames.EnrollRequest
	if err := json.NewDecoder(http.MaxBytesReader(w, r.Body, 16<<10)).Decode(&req); err != nil {
		writeJSON(w, http.StatusBadRequest, frames.HTTPError{Error: "malformed enrollment request: " + err.Error()})
		return
	}
	if !strings.HasPrefix(req.Token, controlplane.TokenPrefix) {
		s.metrics.enrollments.WithLabelValues(string(controlplane.KindUnauthorized)).Inc()
		writeJSON(w, http.StatusUnauthorized, frames.HTTPError{Error: "enrollment token is not valid (tokens start with " + controlplane.TokenPrefix + ")"})
		return
	}
	// Only the token's hash crosses NATS: it is what the control plane stores.
	resp, err := s.cp.Enroll(r.Context(), controlplane.EnrollRequest{TokenHash: controlplane.TokenHash(req.Token), EnrollDevice: req.EnrollDevice})
	if err != nil {
		kind := controlplane.KindOf(err)
		s.metrics.enrollments.WithLabelValues(string(kind)).Inc()
		msg := err.Error()
		switch kind {
		case controlplane.KindInternal:
			s.log.Error("enrollment failed", "remote", r.RemoteAddr, "err", err)
			msg = "internal error"
		case controlplane.KindUnavailable:
			s.log.Warn("enrollment refused: control plane unreachable", "remote", r.RemoteAddr, "err", err)
			msg = "enrollment needs the control plane, which this relay cannot reach right now; try again later (enrolled devices keep connecting)"
		default:
			// A token guesser must not flood the log: one line per interval
			// says how many (each is counted by the metric, and at debug).
			s.log.Debug("enrollment refused", "remote", r.RemoteAddr, "name", req.Name, "reason", msg)
			s.limits.enrollRefusals.note(clientKey(r.RemoteAddr).String(), "enrollment refused", "name", req.Name, "reason", msg)
		}
		writeJSON(w, kind.HTTPStatus(), frames.HTTPError{Error: msg})
		return
	}
	s.metrics.enrollments.WithLabelValues("ok").Inc()
	s.log.Info("device enrolled", "device", resp.Name, "device_id", resp.DeviceID, "remote", r.RemoteAddr)
	writeJSON(w, http.StatusOK, resp)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(v)
}
