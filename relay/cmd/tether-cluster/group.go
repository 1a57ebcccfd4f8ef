package main

import (
	"fmt"
	"os"
	"syscall"
)

// ownGroupArg, as the first argument, makes the launcher a stub that
// moves into a process group of its own and execs the program named
// after it (same PID, so it is still stopped by PID).
//
// Every process the launcher starts goes through it: Ctrl-C on a terminal
// signals the whole foreground process group at once, and NATS would then
// stop while the relays still report to it. In their own groups, only the
// launcher gets the Ctrl-C, and it stops the others in reverse order.
// (cross/harness has no option for a process group; this stands in.)
const ownGroupArg = "-exec-in-own-process-group"

// execInOwnGroup does what ownGroupArg says; it returns only on error.
func execInOwnGroup(argv []string) error {
	if len(argv) == 0 {
		return fmt.Errorf("%s: no program", ownGroupArg)
	}
	if err := syscall.Setpgid(0, 0); err != nil {
		return fmt.Errorf("setpgid: %w", err)
	}
	err := syscall.Exec(argv[0], argv, os.Environ())
	return fmt.Errorf("exec %s: %w", argv[0], err)
}

// inOwnGroup returns the path and arguments that start bin with args in a
// process group of its own.
func inOwnGroup(bin string, args []string) (string, []string, error) {
	self, err := os.Executable()
	if err != nil {
		return "", nil, err
	}
	return self, append([]string{ownGroupArg, bin}, args...), nil
}
