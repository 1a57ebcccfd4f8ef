package relay

import "github.com/prometheus/client_golang/prometheus"

// metrics are the relay's Prometheus collectors.
type metrics struct {
	sessions         prometheus.Gauge
	handshakes       *prometheus.CounterVec
	heartbeats       prometheus.Counter
	deadSessions     prometheus.Counter
	protocolErrors   prometheus.Counter
	streams          prometheus.Counter
	streamsRefused   *prometheus.CounterVec
	httpRequests     *prometheus.CounterVec
	httpErrors       *prometheus.CounterVec
	tcpConns         prometheus.Counter
	tcpListenErrors  prometheus.Counter
	bytes            *prometheus.CounterVec
	enrollments      *prometheus.CounterVec
	controlQueueFull prometheus.Counter
}

func newMetrics(reg prometheus.Registerer) *metrics {
	m := &metrics{
		sessions:         prometheus.NewGauge(prometheus.GaugeOpts{Name: "tether_relay_agent_sessions", Help: "Live agent sessions."}),
		handshakes:       prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_handshakes_total", Help: "Agent handshakes by result."}, []string{"result"}),
		heartbeats:       prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_heartbeats_total", Help: "Heartbeats answered."}),
		deadSessions:     prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_dead_sessions_total", Help: "Sessions closed after three silent heartbeat intervals."}),
		protocolErrors:   prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_protocol_errors_total", Help: "Sessions closed for malformed or unexpected frames."}),
		streams:          prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_streams_opened_total", Help: "Data streams opened to agents."}),
		streamsRefused:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_streams_refused_total", Help: "Data streams refused, by who refused (cap: the relay's per-session cap; agent: the agent)."}, []string{"by"}),
		httpRequests:     prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_http_requests_total", Help: "Public HTTP requests routed to a device."}, []string{"scheme"}),
		httpErrors:       prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_http_errors_total", Help: "Public HTTP requests answered with an error page, by reason."}, []string{"reason"}),
		tcpConns:         prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_tcp_connections_total", Help: "Public TCP connections accepted on leased ports."}),
		tcpListenErrors:  prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_tcp_listen_errors_total", Help: "Leased TCP ports that could not be bound."}),
		bytes:            prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_tcp_bytes_total", Help: "Bytes spliced through TCP leases."}, []string{"direction"}),
		enrollments:      prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_enrollments_total", Help: "Enrollment requests by result."}, []string{"result"}),
		controlQueueFull: prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_control_queue_full_total", Help: "Sessions closed because their control queue was full: the agent stopped reading its control stream."}),
	}
	if reg != nil {
		reg.MustRegister(m.sessions, m.handshakes, m.heartbeats, m.deadSessions, m.protocolErrors, m.streams,
			m.streamsRefused, m.httpRequests, m.httpErrors, m.tcpConns, m.tcpListenErrors, m.bytes, m.enrollments, m.controlQueueFull)
	}
	return m
}
