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
	tcpIdleClosed    prometheus.Counter
	bytes            *prometheus.CounterVec
	enrollments      *prometheus.CounterVec
	controlQueueFull prometheus.Counter

	// Agent updates (update.go).
	updateOffers    prometheus.Counter
	updateDownloads *prometheus.CounterVec
	updateBytes     prometheus.Counter
	updateReports   *prometheus.CounterVec

	// The cluster.
	events          prometheus.Counter
	eventsDropped   prometheus.Counter
	snapshots       prometheus.Counter
	presenceUpdates prometheus.Counter
	replicaLookups  *prometheus.CounterVec
	cpReachable     prometheus.Gauge
	hellos          *prometheus.CounterVec
	syncs           *prometheus.CounterVec
	admissions      *prometheus.CounterVec
	revocations     prometheus.Counter
	forwarded       *prometheus.CounterVec
	forwardFailures *prometheus.CounterVec
	tcpUnbound      prometheus.Gauge
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
		tcpIdleClosed:    prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_tcp_idle_closed_total", Help: "TCP lease connections closed after their idle timeout (a forwarded one by the relay holding the device when the service asked for it)."}),
		bytes:            prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_tcp_bytes_total", Help: "Bytes spliced through TCP leases."}, []string{"direction"}),
		enrollments:      prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_enrollments_total", Help: "Enrollment requests by result."}, []string{"result"}),
		controlQueueFull: prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_control_queue_full_total", Help: "Sessions closed because their control queue was full: the agent stopped reading its control stream."}),

		updateOffers:    prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_update_offers_total", Help: "Agent update offers sent."}),
		updateDownloads: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_update_downloads_total", Help: "Agent update downloads (fetch streams), by result (served, cut: ended before the end, refused, busy: another was running)."}, []string{"result"}),
		updateBytes:     prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_update_bytes_total", Help: "Bytes of agent binaries sent to agents."}),
		updateReports:   prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_update_reports_total", Help: "Agent update statuses received, by state (dropped: over the per-session rate)."}, []string{"state"}),

		events:          prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_device_events_total", Help: "Device events from the control plane applied to the replica."}),
		eventsDropped:   prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_device_events_dropped_total", Help: "Times the device event queue overflowed (a snapshot replaced the dropped events)."}),
		snapshots:       prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_replica_snapshots_total", Help: "Snapshots of the control plane's state taken into the replica."}),
		presenceUpdates: prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_presence_updates_total", Help: "Presence events (session, offline, relay-down) received."}),
		replicaLookups:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_replica_lookups_total", Help: "Public names looked up in the replica (not held by a local session), by result (hit, miss)."}, []string{"result"}),
		cpReachable:     prometheus.NewGauge(prometheus.GaugeOpts{Name: "tether_relay_control_plane_reachable", Help: "1 while the relay's hellos reach the control plane, else 0."}),
		hellos:          prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_hellos_total", Help: "Hellos to the control plane, by result (ok, error)."}, []string{"result"}),
		syncs:           prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_syncs_total", Help: "Session syncs after the control plane was away, by result (ok, error)."}, []string{"result"}),
		admissions:      prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_admissions_total", Help: "Agent sessions admitted, by who authorised them (control_plane, or replica while the control plane was away)."}, []string{"by"}),
		revocations:     prometheus.NewCounter(prometheus.CounterOpts{Name: "tether_relay_revocations_total", Help: "Revocation notices applied and confirmed to the control plane."}),
		forwarded:       prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_forwarded_streams_total", Help: "Public connections forwarded to the relay holding the device, by peer relay."}, []string{"peer"}),
		forwardFailures: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "tether_relay_forward_failures_total", Help: "Forwarding attempts that failed, by reason (not_here, unreachable, refused)."}, []string{"reason"}),
		tcpUnbound:      prometheus.NewGauge(prometheus.GaugeOpts{Name: "tether_relay_tcp_unbound_ports", Help: "Leased TCP ports this relay cannot bind now (retried)."}),
	}
	if reg != nil {
		reg.MustRegister(m.sessions, m.handshakes, m.heartbeats, m.deadSessions, m.protocolErrors, m.streams,
			m.streamsRefused, m.httpRequests, m.httpErrors, m.tcpConns, m.tcpListenErrors, m.tcpIdleClosed, m.bytes, m.enrollments, m.controlQueueFull,
			m.events, m.eventsDropped, m.snapshots, m.presenceUpdates, m.replicaLookups, m.cpReachable, m.hellos, m.syncs,
			m.admissions, m.revocations, m.forwarded, m.forwardFailures, m.tcpUnbound,
			m.updateOffers, m.updateDownloads, m.updateBytes, m.updateReports)
	}
	return m
}
