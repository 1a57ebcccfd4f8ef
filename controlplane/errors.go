package controlplane

import (
	"errors"
	"fmt"
	"net/http"
)

// Kind classifies an Error. Each kind maps to one HTTP status (HTTPStatus)
// and travels over NATS by name.
type Kind string

// Error kinds.
const (
	KindInvalid      Kind = "invalid"      // the request is malformed
	KindUnauthorized Kind = "unauthorized" // bad, expired or used-up token; unknown key
	KindRevoked      Kind = "revoked"      // the device was revoked
	KindNotFound     Kind = "not_found"    // no such device, lease or host
	KindConflict     Kind = "conflict"     // a name is taken; a cloned key
	KindUnavailable  Kind = "unavailable"  // the control plane cannot be reached
	KindInternal     Kind = "internal"     // anything else
)

// Error is a control-plane error whose message is safe to show to the
// caller: it never contains a secret.
type Error struct {
	Kind    Kind   `json:"kind"`
	Message string `json:"message"`
}

func (e *Error) Error() string { return e.Message }

// Errorf returns an *Error of the kind.
func Errorf(kind Kind, format string, args ...any) *Error {
	return &Error{Kind: kind, Message: fmt.Sprintf(format, args...)}
}

// KindOf returns the kind of err: the Kind of an *Error in its chain,
// KindInternal otherwise.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindInternal
}

// HTTPStatus maps a kind to its HTTP status. This is the one place where
// that mapping is made.
func (k Kind) HTTPStatus() int {
	switch k {
	case KindInvalid:
		return http.StatusBadRequest
	case KindUnauthorized:
		return http.StatusUnauthorized
	case KindRevoked:
		return http.StatusForbidden
	case KindNotFound:
		return http.StatusNotFound
	case KindConflict:
		return http.StatusConflict
	case KindUnavailable:
		return http.StatusServiceUnavailable
	}
	return http.StatusInternalServerError
}
