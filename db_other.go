//go:build !(linux || darwin || freebsd || netbsd || openbsd || dragonfly)

package main

import "net"

// unread is db_unix.go's peek where recv(2) with MSG_PEEK is not at hand
// (Windows): it never finds anything, so a pooled connection the server
// closed is found by the retry in Store.withConn instead.
func unread(net.Conn) bool { return false }
