package relay

import (
	"encoding/json"
	"net/http"

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
	resp, err := s.cp.Enroll(r.Context(), req)
	if err != nil {
		kind := controlplane.KindOf(err)
		s.metrics.enrollments.WithLabelValues(string(kind)).Inc()
		msg := err.Error()
		if kind == controlplane.KindInternal {
			s.log.Error("enrollment failed", "remote", r.RemoteAddr, "err", err)
			msg = "internal error"
		} else {
			s.log.Info("enrollment refused", "remote", r.RemoteAddr, "name", req.Name, "reason", msg)
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
