package relay

// HandshakesAtGate returns how many agent connections hold a handshake
// slot or wait for one, for tests that must know their connections have
// reached the gate.
func (s *Server) HandshakesAtGate() int { return len(s.gate.slots) + int(s.gate.waiting.Load()) }
