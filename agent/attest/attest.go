package attest

import (
	"context"
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"

	cav1 "github.com/trustmesh/trustmesh/api/ca/v1"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"
)

// ErrGone is returned when the attested process has exited or its PID now
// names another process.
var ErrGone = errors.New("attest: the calling process is gone")

// ErrUnsupported is returned where the platform cannot attest a peer.
var ErrUnsupported = errors.New("attest: peer attestation is not supported on this platform")

// Options configure Credentials.
type Options struct {
	// ProcRoot is where procfs is mounted; default "/proc". It must be the
	// procfs of the PID namespace the peers' PIDs are read in.
	ProcRoot string
	// NetnsDir is where named network namespaces are; default "/run/netns".
	NetnsDir string
	// NoPidfd forces the SO_PEERCRED fallback even where the kernel has
	// SO_PEERPIDFD.
	NoPidfd bool
	// KubeletCgroupRoot is the kubelet's --cgroup-root when it is not the
	// default (a nested node, as kind's "/kubelet"); see ParseCgroupUnder.
	// Only cgroups there or at the top are pods'.
	KubeletCgroupRoot string
}

func (o Options) withDefaults() Options {
	if o.ProcRoot == "" {
		o.ProcRoot = "/proc"
	}
	if o.NetnsDir == "" {
		o.NetnsDir = "/run/netns"
	}
	return o
}

// Credentials returns gRPC server transport credentials for a unix listener.
// The handshake pins the peer process (see the package doc) and attaches it
// as the connection's AuthInfo, which PeerFromContext returns; closing the
// connection releases it. A connection whose peer cannot be pinned fails its
// handshake. They have no client side.
func Credentials(opts Options) credentials.TransportCredentials {
	return &transport{opts: opts.withDefaults(), hashes: newHashCache(hashCacheSize)}
}

type transport struct {
	opts   Options
	hashes *hashCache
}

const authType = "trustmesh-attest"

func (t *transport) ClientHandshake(context.Context, string, net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return nil, nil, errors.New("attest: credentials are for servers only")
}

func (t *transport) ServerHandshake(c net.Conn) (net.Conn, credentials.AuthInfo, error) {
	p, err := newPeer(t, c)
	if err != nil {
		return nil, nil, err
	}
	return &conn{Conn: c, peer: p}, p, nil
}

func (t *transport) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: authType}
}

func (t *transport) Clone() credentials.TransportCredentials {
	return &transport{opts: t.opts, hashes: t.hashes}
}

func (t *transport) OverrideServerName(string) error { return nil }

// conn releases its peer's process handles when closed.
type conn struct {
	net.Conn
	peer *Peer
	once sync.Once
}

func (c *conn) Close() error {
	err := c.Conn.Close()
	c.once.Do(c.peer.release)
	return err
}

// PeerFromContext returns the pinned peer of a gRPC call served with
// Credentials.
func PeerFromContext(ctx context.Context) (*Peer, bool) {
	pr, ok := peer.FromContext(ctx)
	if !ok {
		return nil, false
	}
	p, ok := pr.AuthInfo.(*Peer)
	return p, ok && p != nil
}

// AuthType names the credentials, for credentials.AuthInfo.
func (p *Peer) AuthType() string { return authType }

// Caller is what Attest found out about a calling process.
type Caller struct {
	PID int32
	// UID and GID are the process's real user and group ids.
	UID, GID uint32
	// Path is the executable's absolute path as the kernel reports it, in
	// the process's own mount namespace (a container's path for a process
	// in a container); a deleted file ends in " (deleted)".
	Path string
	// PodUID and ContainerID are from the process's cgroup; "" outside a
	// pod.
	PodUID, ContainerID string
	// Netns is the device and inode of the process's network namespace.
	Netns FileID
	// Mntns is the device and inode of the process's mount namespace, and
	// HostMounts whether it is the node agent's own. Path means a file of
	// the node only in the agent's mount namespace: anyone can make a user
	// and mount namespace of their own and bind any program over
	// /usr/bin/true there. So unix:path: and unix:sha256: match only a
	// caller with HostMounts.
	Mntns      FileID
	HostMounts bool

	exe  exeKey // the executable file, for unix:sha256:
	peer *Peer
}

// FileID names a file by device and inode.
type FileID struct{ Dev, Ino uint64 }

// exeKey names one content of one file: a changed file changes size,
// mtime or ctime.
type exeKey struct {
	FileID
	Size                 int64
	MtimeNsec, CtimeNsec int64
}

// Matches reports whether the caller satisfies every selector. An empty
// list, an unknown selector type and a malformed value never match.
func (c *Caller) Matches(selectors []string) bool {
	if c == nil || len(selectors) == 0 {
		return false
	}
	for _, s := range selectors {
		if !c.matches(s) {
			return false
		}
	}
	return true
}

func (c *Caller) matches(sel string) bool {
	switch {
	case strings.HasPrefix(sel, cav1.SelectorUID):
		v, ok := parseID(sel[len(cav1.SelectorUID):])
		return ok && v == c.UID
	case strings.HasPrefix(sel, cav1.SelectorGID):
		v, ok := parseID(sel[len(cav1.SelectorGID):])
		return ok && v == c.GID
	case strings.HasPrefix(sel, cav1.SelectorPath):
		v := sel[len(cav1.SelectorPath):]
		return c.HostMounts && v != "" && strings.HasPrefix(v, "/") && v == c.Path
	case strings.HasPrefix(sel, cav1.SelectorSHA256):
		v := sel[len(cav1.SelectorSHA256):]
		if !c.HostMounts || len(v) != 64 || strings.ToLower(v) != v {
			return false
		}
		sum, err := c.exeSHA256()
		return err == nil && sum == v
	case strings.HasPrefix(sel, cav1.SelectorNetns):
		v := sel[len(cav1.SelectorNetns):]
		path, ok := c.netnsPath(v)
		if !ok || c.Netns == (FileID{}) {
			return false
		}
		id, err := statFileID(path)
		return err == nil && id == c.Netns
	case strings.HasPrefix(sel, cav1.SelectorPodUID):
		v := sel[len(cav1.SelectorPodUID):]
		return v != "" && v == c.PodUID
	default:
		return false
	}
}

// parseID parses a decimal uid or gid, nothing else.
func parseID(s string) (uint32, bool) {
	if s == "" || !isDigits(s) {
		return 0, false
	}
	v, err := strconv.ParseUint(s, 10, 32)
	return uint32(v), err == nil
}

// netnsPath turns a netns selector's value into a file: an absolute path
// as is, else one name under NetnsDir.
func (c *Caller) netnsPath(v string) (string, bool) {
	if strings.HasPrefix(v, "/") {
		return v, true
	}
	if v == "" || v == "." || v == ".." || strings.Contains(v, "/") || c.peer == nil {
		return "", false
	}
	return c.peer.t.opts.NetnsDir + "/" + v, true
}

// exeSHA256 hashes the executable the caller runs, through its exe link,
// and only if it is still the file attested.
func (c *Caller) exeSHA256() (string, error) {
	if c.peer == nil || c.exe == (exeKey{}) {
		return "", fmt.Errorf("attest: no executable attested")
	}
	if sum, ok := c.peer.t.hashes.get(c.exe); ok {
		return sum, nil
	}
	sum, err := c.peer.hashExe(c.exe)
	if err != nil {
		return "", err
	}
	c.peer.t.hashes.put(c.exe, sum)
	return sum, nil
}

// hashCacheSize bounds the SHA-256 cache: a node runs far fewer distinct
// executables.
const hashCacheSize = 1024

type hashCache struct {
	mu  sync.Mutex
	max int
	m   map[exeKey]string
}

func newHashCache(max int) *hashCache { return &hashCache{max: max, m: make(map[exeKey]string)} }

func (h *hashCache) get(k exeKey) (string, bool) {
	h.mu.Lock()
	defer h.mu.Unlock()
	v, ok := h.m[k]
	return v, ok
}

func (h *hashCache) put(k exeKey, v string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if len(h.m) >= h.max {
		clear(h.m)
	}
	h.m[k] = v
}
