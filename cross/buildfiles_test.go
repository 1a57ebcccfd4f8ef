package cross

import (
	"slices"
	"testing"
)

func TestGoBuilds(t *testing.T) {
	tests := []struct {
		name, file string
		want       []GoBuild
	}{
		{"make, agent in a list without tags", `
GO       ?= go
LDFLAGS  := -s -w -X main.version=$(VERSION)
CMDS     := ./relay/cmd/tether-relay ./agent/cmd/tether-agent
build: ## build
	@mkdir -p bin
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o bin/ $(CMDS)
`, []GoBuild{{Line: 7, LDFlags: "-s -w -X main.version=$(VERSION)", Pkgs: []string{"./relay/cmd/tether-relay", "./agent/cmd/tether-agent"}}}},
		{"make, AGENT_TAGS and a build of its own", `
GO ?= go
export CGO_ENABLED := 0
AGENT_TAGS := nethttpomithttp2
build:
	$(GO) build -trimpath -tags '$(AGENT_TAGS)' -ldflags "-s -w" \
		-o bin/ ./agent/cmd/tether-agent
`, []GoBuild{{Line: 6, Tags: "nethttpomithttp2", LDFlags: "-s -w", Pkgs: []string{"./agent/cmd/tether-agent"}}}},
		{"docker, ARG and a chain of commands", `
ARG VERSION=dev
ARG AGENT_TAGS=nethttpomithttp2
RUN go build -trimpath -ldflags "-s -w -X main.version=${VERSION}" -o /out/ ./relay/cmd/tether-relay \
 && CGO_ENABLED=0 go build -trimpath -tags=$AGENT_TAGS -gcflags=all=-B -ldflags "-s -w" -o /out/ ./agent/cmd/tether-agent/ \
 && mkdir -p /out/state
`, []GoBuild{
			{Line: 4, LDFlags: "-s -w -X main.version=dev", Pkgs: []string{"./relay/cmd/tether-relay"}},
			{Line: 4, Tags: "nethttpomithttp2", GCFlags: "all=-B", LDFlags: "-s -w", Pkgs: []string{"./agent/cmd/tether-agent/"}},
		}},
		{"no builds", "run:\n\tgo run ./cross/cmd/bench\n# go build ./agent/cmd/tether-agent\n", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := GoBuilds([]byte(tt.file))
			if !slices.EqualFunc(got, tt.want, func(a, b GoBuild) bool {
				return a.Line == b.Line && a.Tags == b.Tags && a.LDFlags == b.LDFlags && a.GCFlags == b.GCFlags && slices.Equal(a.Pkgs, b.Pkgs)
			}) {
				t.Fatalf("got  %+v\nwant %+v", got, tt.want)
			}
		})
	}
	b := GoBuild{Pkgs: []string{"github.com/tetherfleet/tether/agent/cmd/tether-agent"}}
	if !b.Builds(agentPkg) || (GoBuild{Pkgs: []string{"./agent/cmd/tether-agentx"}}).Builds(agentPkg) {
		t.Error("Builds matches the wrong packages")
	}
	if !SameTags("a,b", "b a") || SameTags("a", "a,b") || !SameTags("", "") {
		t.Error("SameTags")
	}
}
