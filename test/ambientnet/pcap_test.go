package ambientnet

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"net/netip"
	"os"
	"sort"
)

// segment is one TCP segment with a payload, as captured.
type segment struct {
	src, dst netip.AddrPort
	seq      uint32
	payload  []byte
}

// readPcap reads the TCP segments with payload of a classic pcap file of an
// Ethernet link (tcpdump -w).
func readPcap(path string) ([]segment, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if len(b) < 24 {
		return nil, fmt.Errorf("pcap %s: %d bytes, no header", path, len(b))
	}
	var bo binary.ByteOrder
	switch binary.LittleEndian.Uint32(b) {
	case 0xa1b2c3d4, 0xa1b23c4d:
		bo = binary.LittleEndian
	default:
		bo = binary.BigEndian
	}
	if lt := bo.Uint32(b[20:]); lt != 1 {
		return nil, fmt.Errorf("pcap %s: link type %d, want Ethernet", path, lt)
	}
	var segs []segment
	for off := 24; off+16 <= len(b); {
		incl := int(bo.Uint32(b[off+8:]))
		orig := int(bo.Uint32(b[off+12:]))
		off += 16
		if off+incl > len(b) {
			break
		}
		pkt := b[off : off+incl]
		off += incl
		if incl != orig {
			return nil, fmt.Errorf("pcap %s: a packet was truncated (%d of %d bytes): capture with -s 0", path, incl, orig)
		}
		if s, ok := parseTCP(pkt); ok && len(s.payload) > 0 {
			segs = append(segs, s)
		}
	}
	return segs, nil
}

func parseTCP(pkt []byte) (segment, bool) {
	if len(pkt) < 14 {
		return segment{}, false
	}
	etype := binary.BigEndian.Uint16(pkt[12:])
	ip := pkt[14:]
	var src, dst netip.Addr
	var tcp []byte
	switch etype {
	case 0x0800:
		if len(ip) < 20 || ip[9] != 6 {
			return segment{}, false
		}
		ihl := int(ip[0]&0xf) * 4
		total := int(binary.BigEndian.Uint16(ip[2:]))
		if total > len(ip) || ihl > total {
			return segment{}, false
		}
		src, _ = netip.AddrFromSlice(ip[12:16])
		dst, _ = netip.AddrFromSlice(ip[16:20])
		tcp = ip[ihl:total]
	case 0x86dd:
		if len(ip) < 40 || ip[6] != 6 {
			return segment{}, false
		}
		plen := int(binary.BigEndian.Uint16(ip[4:]))
		if 40+plen > len(ip) {
			return segment{}, false
		}
		src, _ = netip.AddrFromSlice(ip[8:24])
		dst, _ = netip.AddrFromSlice(ip[24:40])
		tcp = ip[40 : 40+plen]
	default:
		return segment{}, false
	}
	if len(tcp) < 20 {
		return segment{}, false
	}
	doff := int(tcp[12]>>4) * 4
	if doff > len(tcp) {
		return segment{}, false
	}
	return segment{
		src:     netip.AddrPortFrom(src, binary.BigEndian.Uint16(tcp[0:])),
		dst:     netip.AddrPortFrom(dst, binary.BigEndian.Uint16(tcp[2:])),
		seq:     binary.BigEndian.Uint32(tcp[4:]),
		payload: tcp[doff:],
	}, true
}

type flowKey struct{ src, dst netip.AddrPort }

// streams reassembles each direction's bytes in sequence order
// (retransmissions dropped).
func streams(segs []segment) map[flowKey][]byte {
	by := map[flowKey][]segment{}
	for _, s := range segs {
		k := flowKey{s.src, s.dst}
		by[k] = append(by[k], s)
	}
	out := map[flowKey][]byte{}
	for k, ss := range by {
		sort.SliceStable(ss, func(i, j int) bool { return int32(ss[i].seq-ss[0].seq) < int32(ss[j].seq-ss[0].seq) })
		var buf []byte
		next := ss[0].seq
		for _, s := range ss {
			d := int32(s.seq - next)
			switch {
			case d == 0:
				buf = append(buf, s.payload...)
				next += uint32(len(s.payload))
			case d < 0 && int(-d) < len(s.payload):
				buf = append(buf, s.payload[-d:]...)
				next += uint32(len(s.payload) + int(d))
			}
		}
		out[k] = buf
	}
	return out
}

// tlsRecords checks that b is a sequence of TLS records (content types
// 20–23, legacy version 3.x), the last one possibly cut by the end of the
// capture; it returns how many it read.
func tlsRecords(b []byte) (int, error) {
	n := 0
	for len(b) > 0 {
		if len(b) < 5 {
			return n, nil
		}
		if b[0] < 20 || b[0] > 23 || b[1] != 3 {
			return n, fmt.Errorf("record %d: header % x is not TLS", n, b[:5])
		}
		l := int(binary.BigEndian.Uint16(b[3:]))
		n++
		if 5+l > len(b) {
			return n, nil
		}
		b = b[5+l:]
	}
	return n, nil
}

func containsAny(segs []segment, marker []byte) bool {
	for _, s := range segs {
		if bytes.Contains(s.payload, marker) {
			return true
		}
	}
	return false
}
