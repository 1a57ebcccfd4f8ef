package cross

import (
	"os"
	"testing"

	"github.com/tetherfleet/tether/relay/relaytest"
)

func TestMain(m *testing.M) {
	code := relaytest.CheckLeaks(m)
	if builtDir != "" {
		os.RemoveAll(builtDir)
	}
	os.Exit(code)
}
