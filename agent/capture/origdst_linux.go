//go:build linux

package capture

import (
	"encoding/binary"
	"fmt"
	"net"
	"net/netip"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// OriginalDst is the address a redirected TCP connection was made to:
// SO_ORIGINAL_DST for IPv4 (also on a dual-stack socket), IP6T_SO_ORIGINAL_DST
// for IPv6. It needs the connection tracked in the accepting namespace, as
// REDIRECT and TPROXY rules make it; for a TPROXY connection it equals the
// local address.
func OriginalDst(c net.Conn) (netip.AddrPort, error) {
	sc, ok := c.(syscall.Conn)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("capture: original destination: %T is not a socket", c)
	}
	la, ok := c.LocalAddr().(*net.TCPAddr)
	if !ok {
		return netip.AddrPort{}, fmt.Errorf("capture: original destination: %v is not TCP", c.LocalAddr())
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("capture: original destination: %w", err)
	}
	v4 := la.AddrPort().Addr().Unmap().Is4()
	var ap netip.AddrPort
	var serr error
	err = raw.Control(func(fd uintptr) {
		if v4 {
			var sa unix.RawSockaddrInet4
			if serr = getsockopt(fd, unix.SOL_IP, unix.SO_ORIGINAL_DST, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); serr == nil {
				ap = netip.AddrPortFrom(netip.AddrFrom4(sa.Addr), port(sa.Port))
			}
			return
		}
		var sa unix.RawSockaddrInet6
		if serr = getsockopt(fd, unix.SOL_IPV6, ip6tSoOriginalDst, unsafe.Pointer(&sa), unsafe.Sizeof(sa)); serr == nil {
			ap = netip.AddrPortFrom(netip.AddrFrom16(sa.Addr), port(sa.Port))
		}
	})
	if err == nil {
		err = serr
	}
	if err != nil {
		return netip.AddrPort{}, fmt.Errorf("capture: original destination of %v: %w", la, err)
	}
	return ap, nil
}

// ip6tSoOriginalDst is IP6T_SO_ORIGINAL_DST of linux/netfilter_ipv6/ip6_tables.h.
const ip6tSoOriginalDst = 80

func getsockopt(fd uintptr, level, opt int, p unsafe.Pointer, size uintptr) error {
	l := uint32(size)
	_, _, e := unix.Syscall6(unix.SYS_GETSOCKOPT, fd, uintptr(level), uintptr(opt), uintptr(p), uintptr(unsafe.Pointer(&l)), 0)
	if e != 0 {
		return e
	}
	return nil
}

// port converts a sockaddr's port, stored in network byte order.
func port(p uint16) uint16 {
	var b [2]byte
	*(*uint16)(unsafe.Pointer(&b[0])) = p
	return binary.BigEndian.Uint16(b[:])
}
