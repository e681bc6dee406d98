//go:build linux || darwin || freebsd || netbsd || openbsd || dragonfly

package main

import (
	"errors"
	"net"
	"syscall"
)

// unread reports whether c, an idle connection, has bytes or an end of
// stream waiting. It peeks without blocking (one recv(2) with MSG_PEEK and
// MSG_DONTWAIT) and consumes nothing. It goes through Control, not Read:
// pgx's background reader may be blocked in a read of this connection,
// holding its read lock. Not pgx's CheckConn: that waits 1 ms.
func unread(c net.Conn) bool {
	if tc, ok := c.(interface{ NetConn() net.Conn }); ok { // TLS
		c = tc.NetConn()
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return false
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return false
	}
	var b [1]byte
	var n int
	var rerr error
	if err := raw.Control(func(fd uintptr) {
		n, _, rerr = syscall.Recvfrom(int(fd), b[:], syscall.MSG_PEEK|syscall.MSG_DONTWAIT)
	}); err != nil {
		return true
	}
	return n > 0 || !errors.Is(rerr, syscall.EAGAIN)
}
