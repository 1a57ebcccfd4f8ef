module github.com/tetherfleet/tether

go 1.26

require (
	github.com/coder/websocket v1.8.15
	github.com/xtaci/smux v1.5.56
)

replace github.com/xtaci/smux => ./frames/wsmux/third_party/smux
