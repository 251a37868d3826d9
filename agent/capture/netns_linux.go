//go:build linux

package capture

import (
	"context"
	"fmt"
	"net"
	"net/netip"
	"os"
	"runtime"
	"syscall"

	"golang.org/x/sys/unix"
)

// open opens the namespace file and checks that it is a network namespace
// and, when n is pinned, the pinned one.
func (n Netns) open() (*os.File, error) {
	if n.Path == "" {
		return nil, fmt.Errorf("capture: network namespace without a path")
	}
	f, err := os.Open(n.Path)
	if err != nil {
		return nil, fmt.Errorf("capture: opening network namespace: %w", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("capture: network namespace %s: %w", n.Path, err)
	}
	if n.Ino != 0 && (st.Ino != n.Ino || st.Dev != n.Dev) {
		f.Close()
		return nil, fmt.Errorf("capture: %s is no longer network namespace %d:%d (its process is gone)", n.Path, n.Dev, n.Ino)
	}
	return f, nil
}

// Do runs fn on a new OS thread that has entered n, and returns fn's error.
// The thread is never unlocked: it ends with fn, so nothing else runs in n.
// Only fn's own goroutine is in n: goroutines it starts run in the node's
// namespace.
func (n Netns) Do(fn func() error) error {
	f, err := n.open()
	if err != nil {
		return err
	}
	defer f.Close()
	done := make(chan error, 1)
	go n.enter(f, fn, done)
	return <-done
}

// enter runs fn on this goroutine's thread after moving it into the
// namespace f; the thread is then never unlocked, so that it ends with the
// goroutine instead of serving others in the pod's namespace.
func (n Netns) enter(f *os.File, fn func() error, done chan<- error) {
	runtime.LockOSThread()
	if unix.Gettid() == unix.Getpid() {
		// The main thread cannot end: the runtime would park it for good,
		// still in the pod's namespace (which then lives as long as the
		// process). Keep it locked to this goroutine, so the next one gets
		// another thread, and give it back unchanged.
		inner := make(chan error, 1)
		go n.enter(f, fn, inner)
		err := <-inner
		runtime.UnlockOSThread()
		done <- err
		return
	}
	// No UnlockOSThread from here: the goroutine exits locked, and the
	// runtime then ends this thread instead of reusing it outside n.
	if err := unix.Setns(int(f.Fd()), unix.CLONE_NEWNET); err != nil {
		done <- fmt.Errorf("capture: entering network namespace %s: %w", n.Path, err)
		return
	}
	done <- fn()
}

// markControl sets SO_MARK (when mark is not 0) and, when transparent,
// IP_TRANSPARENT or IPV6_TRANSPARENT on a socket before it binds.
func markControl(mark int, transparent bool) func(network, address string, c syscall.RawConn) error {
	return func(network, address string, c syscall.RawConn) error {
		var serr error
		err := c.Control(func(fd uintptr) {
			if mark != 0 {
				if serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_MARK, mark); serr != nil {
					serr = fmt.Errorf("capture: SO_MARK %#x: %w", mark, serr)
					return
				}
			}
			if transparent {
				if network == "tcp6" {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IPV6, unix.IPV6_TRANSPARENT, 1)
				} else {
					serr = unix.SetsockoptInt(int(fd), unix.SOL_IP, unix.IP_TRANSPARENT, 1)
				}
				if serr != nil {
					serr = fmt.Errorf("capture: transparent socket: %w", serr)
				}
			}
		})
		if err != nil {
			return err
		}
		return serr
	}
}

// checkAddr refuses addresses that are not an IP literal (or an empty host
// for a listener): resolving a name would happen outside the namespace.
func checkAddr(network, addr string, listen bool) error {
	switch network {
	case "tcp", "tcp4", "tcp6":
	default:
		return fmt.Errorf("capture: network %q: only tcp, tcp4 and tcp6", network)
	}
	host, _, err := net.SplitHostPort(addr)
	if err != nil {
		return fmt.Errorf("capture: address %q: %w", addr, err)
	}
	if host == "" && listen {
		return nil
	}
	if _, err := netip.ParseAddrPort(addr); err != nil {
		return fmt.Errorf("capture: address %q is not IP:port (names are not resolved inside a namespace): %w", addr, err)
	}
	return nil
}

// Listen opens a TCP listener inside n; its sockets carry mark (0 = none).
func (n Netns) Listen(ctx context.Context, network, addr string, mark int) (net.Listener, error) {
	return n.listen(ctx, network, addr, mark, false)
}

// ListenTransparent is Listen with IP_TRANSPARENT, as a TPROXY target needs.
func (n Netns) ListenTransparent(ctx context.Context, network, addr string, mark int) (net.Listener, error) {
	return n.listen(ctx, network, addr, mark, true)
}

func (n Netns) listen(ctx context.Context, network, addr string, mark int, transparent bool) (net.Listener, error) {
	if err := checkAddr(network, addr, true); err != nil {
		return nil, err
	}
	var l net.Listener
	err := n.Do(func() error {
		lc := net.ListenConfig{Control: markControl(mark, transparent)}
		var err error
		l, err = lc.Listen(ctx, network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("capture: listening on %s in %s: %w", addr, n.Path, err)
	}
	return l, nil
}

// Dial connects from inside n to addr (an IP literal); the socket carries
// mark (0 = none).
func (n Netns) Dial(ctx context.Context, network, addr string, mark int) (net.Conn, error) {
	if err := checkAddr(network, addr, false); err != nil {
		return nil, err
	}
	var c net.Conn
	err := n.Do(func() error {
		d := net.Dialer{Control: markControl(mark, false)}
		var err error
		c, err = d.DialContext(ctx, network, addr)
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("capture: dialing %s in %s: %w", addr, n.Path, err)
	}
	return c, nil
}

// DialTransparent connects from inside n to dst with src as the source
// address (any port), on a transparent socket marked mark, so that the
// application at dst sees src. Its replies reach the socket only when n has
// rules installed with TPROXY (and the same mark).
func (n Netns) DialTransparent(ctx context.Context, network string, src netip.Addr, dst netip.AddrPort, mark int) (net.Conn, error) {
	if err := checkAddr(network, dst.String(), false); err != nil {
		return nil, err
	}
	if mark == 0 {
		return nil, fmt.Errorf("capture: a transparent connection needs the proxy's mark, or the replies do not come back")
	}
	if !src.IsValid() || src.Unmap().Is4() != dst.Addr().Unmap().Is4() {
		return nil, fmt.Errorf("capture: source %v and destination %v are not of one address family", src, dst)
	}
	var c net.Conn
	err := n.Do(func() error {
		d := net.Dialer{
			LocalAddr: net.TCPAddrFromAddrPort(netip.AddrPortFrom(src.Unmap(), 0)),
			Control:   markControl(mark, true),
		}
		var err error
		c, err = d.DialContext(ctx, network, netip.AddrPortFrom(dst.Addr().Unmap(), dst.Port()).String())
		return err
	})
	if err != nil {
		return nil, fmt.Errorf("capture: transparent dial from %v to %v in %s: %w", src, dst, n.Path, err)
	}
	return c, nil
}
