//go:build linux

package attest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// newPeer pins the process at the other end of c.
func newPeer(t *transport, c net.Conn) (*Peer, error) {
	if c.LocalAddr() == nil || c.LocalAddr().Network() != "unix" {
		return nil, errors.New("attest: not a unix stream connection")
	}
	sc, ok := c.(syscall.Conn)
	if !ok {
		return nil, errors.New("attest: connection has no file descriptor")
	}
	raw, err := sc.SyscallConn()
	if err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	accepted, err := bootTime()
	if err != nil {
		return nil, err
	}
	var (
		cred              *unix.Ucred
		credErr, pidfdErr error
		pidfd             = -1
	)
	if err := raw.Control(func(fd uintptr) {
		cred, credErr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
		if !t.opts.NoPidfd {
			pidfd, pidfdErr = unix.GetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_PEERPIDFD)
		}
	}); err != nil {
		return nil, fmt.Errorf("attest: %w", err)
	}
	if credErr != nil {
		return nil, fmt.Errorf("attest: SO_PEERCRED: %w", credErr)
	}
	p := &Peer{t: t, pidfd: -1, dir: -1}
	switch {
	case t.opts.NoPidfd, errors.Is(pidfdErr, unix.ENOPROTOOPT):
		p.pid = cred.Pid
	case errors.Is(pidfdErr, unix.ESRCH):
		// Kernels before 6.9 have no pidfd for a reaped peer.
		return nil, fmt.Errorf("%w: SO_PEERPIDFD: %w", ErrGone, pidfdErr)
	case pidfdErr != nil:
		return nil, fmt.Errorf("attest: SO_PEERPIDFD: %w", pidfdErr)
	default:
		p.pidfd = pidfd
		syscall.CloseOnExec(pidfd)
		pid, err := pidOfPidfd(t.opts.ProcRoot, pidfd)
		if err != nil {
			p.release()
			return nil, err
		}
		p.pid = pid
	}
	if p.pid <= 0 {
		p.release()
		return nil, fmt.Errorf("%w: no PID in this PID namespace", ErrGone)
	}
	dir, err := unix.Open(t.opts.ProcRoot+"/"+strconv.Itoa(int(p.pid)), unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		p.release()
		return nil, fmt.Errorf("%w: opening its /proc entry: %w", ErrGone, err)
	}
	p.dir = dir
	st, err := readStat(dir)
	if err != nil {
		p.release()
		return nil, fmt.Errorf("%w: %w", ErrGone, err)
	}
	p.start = st.start
	if p.pidfd < 0 && !startedBefore(st.start, clockTicks, accepted) {
		p.release()
		return nil, fmt.Errorf("%w: PID %d was reused: its process started after the connection", ErrGone, p.pid)
	}
	if err := p.confirm(); err != nil {
		p.release()
		return nil, err
	}
	return p, nil
}

// clockTicks is USER_HZ, the unit of /proc/PID/stat's times: 100 on every
// architecture Linux runs the node agent on.
const clockTicks = 100

// startedBefore reports whether a process whose /proc/PID/stat start time
// is startTicks (clock ticks after boot) may have started no later than
// at, a CLOCK_BOOTTIME reading. A start within at's own tick counts as
// before: the tick is all stat says.
func startedBefore(startTicks uint64, ticksPerSecond uint64, at time.Duration) bool {
	tick := time.Second / time.Duration(ticksPerSecond)
	return time.Duration(startTicks) <= at/tick
}

func bootTime() (time.Duration, error) {
	var ts unix.Timespec
	if err := unix.ClockGettime(unix.CLOCK_BOOTTIME, &ts); err != nil {
		return 0, fmt.Errorf("attest: CLOCK_BOOTTIME: %w", err)
	}
	return time.Duration(ts.Nano()), nil
}

// pidOfPidfd reads the PID a pidfd names from /proc/self/fdinfo.
func pidOfPidfd(procRoot string, pidfd int) (int32, error) {
	b, err := os.ReadFile(procRoot + "/self/fdinfo/" + strconv.Itoa(pidfd))
	if err != nil {
		return 0, fmt.Errorf("attest: reading the pidfd's fdinfo: %w", err)
	}
	for line := range strings.SplitSeq(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "Pid:"); ok {
			pid, err := strconv.ParseInt(strings.TrimSpace(v), 10, 32)
			if err != nil {
				return 0, fmt.Errorf("attest: pidfd fdinfo Pid %q: %w", v, err)
			}
			if pid <= 0 {
				// -1: the process has exited; 0: it is in a PID
				// namespace this one cannot see.
				return 0, fmt.Errorf("%w: pidfd names PID %d", ErrGone, pid)
			}
			return int32(pid), nil
		}
	}
	return 0, errors.New("attest: pidfd fdinfo has no Pid line")
}

// release closes the peer's handles.
func (p *Peer) release() {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.closed {
		return
	}
	p.closed = true
	if p.pidfd >= 0 {
		unix.Close(p.pidfd)
	}
	if p.dir >= 0 {
		unix.Close(p.dir)
	}
}

// Alive reports whether the pinned process still runs: it has not exited
// and its PID names it still.
func (p *Peer) Alive() bool {
	p.mu.RLock()
	defer p.mu.RUnlock()
	return !p.closed && p.confirm() == nil
}

// confirm checks, with p.mu held, that the pinned process is still alive and
// the same: the pidfd has not signalled exit, and /proc/PID/stat read through
// the directory opened at the handshake is not a zombie's and has the same
// start time.
func (p *Peer) confirm() error {
	if p.closed {
		return fmt.Errorf("%w: connection closed", ErrGone)
	}
	if p.pidfd >= 0 {
		fds := []unix.PollFd{{Fd: int32(p.pidfd), Events: unix.POLLIN}}
		for {
			n, err := unix.Poll(fds, 0)
			if errors.Is(err, unix.EINTR) {
				continue
			}
			if err != nil {
				return fmt.Errorf("attest: polling the pidfd: %w", err)
			}
			if n > 0 && fds[0].Revents != 0 {
				return fmt.Errorf("%w: process %d has exited", ErrGone, p.pid)
			}
			break
		}
		if err := unix.PidfdSendSignal(p.pidfd, 0, nil, 0); errors.Is(err, unix.ESRCH) {
			return fmt.Errorf("%w: process %d has exited", ErrGone, p.pid)
		}
	}
	st, err := readStat(p.dir)
	if err != nil {
		return fmt.Errorf("%w: %w", ErrGone, err)
	}
	if st.state == 'Z' || st.state == 'X' || st.state == 'x' {
		return fmt.Errorf("%w: process %d has exited", ErrGone, p.pid)
	}
	if st.start != p.start {
		return fmt.Errorf("%w: PID %d names another process", ErrGone, p.pid)
	}
	return nil
}

// Attest reads the caller's attributes through the handles pinned at the
// handshake, then confirms the process is still the same one: an error
// wrapping ErrGone if it has exited or its PID was reused.
func (p *Peer) Attest(ctx context.Context) (*Caller, error) {
	if err := ctx.Err(); err != nil {
		return nil, err
	}
	p.mu.RLock()
	defer p.mu.RUnlock()
	if err := p.confirm(); err != nil {
		return nil, err
	}
	c, err := p.read()
	// Whatever was read, it is the caller's only if the caller is still
	// there now.
	if cerr := p.confirm(); cerr != nil {
		return nil, cerr
	}
	if err != nil {
		return nil, err
	}
	return c, nil
}

// read reads the attributes, with p.mu held.
func (p *Peer) read() (*Caller, error) {
	c := &Caller{PID: p.pid, peer: p}
	status, err := readAt(p.dir, "status")
	if err != nil {
		return nil, err
	}
	if c.UID, err = statusID(status, "Uid:"); err != nil {
		return nil, err
	}
	if c.GID, err = statusID(status, "Gid:"); err != nil {
		return nil, err
	}
	// Every process that can connect to a socket runs an executable; one
	// whose link cannot be read is exiting (or not a user process).
	if c.Path, err = readlinkAt(p.dir, "exe"); err != nil {
		return nil, fmt.Errorf("attest: reading the executable link: %w", err)
	}
	if c.exe, err = exeKeyAt(p.dir); err != nil {
		return nil, err
	}
	cg, err := readAt(p.dir, "cgroup")
	if err != nil {
		return nil, err
	}
	if c.PodUID, c.ContainerID, err = ParseCgroupUnder(bytes.NewReader(cg), p.t.opts.KubeletCgroupRoot); err != nil {
		return nil, err
	}
	var st unix.Stat_t
	if err := unix.Fstatat(p.dir, "ns/net", &st, 0); err != nil {
		return nil, fmt.Errorf("attest: reading the network namespace: %w", err)
	}
	c.Netns = FileID{Dev: st.Dev, Ino: st.Ino}
	if err := unix.Fstatat(p.dir, "ns/mnt", &st, 0); err != nil {
		return nil, fmt.Errorf("attest: reading the mount namespace: %w", err)
	}
	c.Mntns = FileID{Dev: st.Dev, Ino: st.Ino}
	own, err := statFileID("/proc/self/ns/mnt")
	if err != nil {
		return nil, fmt.Errorf("attest: reading the node agent's own mount namespace: %w", err)
	}
	c.HostMounts = own == c.Mntns
	return c, nil
}

// hashExe hashes the executable through the pinned /proc entry's exe link,
// if it is still the file key names.
func (p *Peer) hashExe(key exeKey) (string, error) {
	p.mu.RLock()
	defer p.mu.RUnlock()
	if p.closed {
		return "", fmt.Errorf("%w: connection closed", ErrGone)
	}
	fd, err := unix.Openat(p.dir, "exe", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return "", fmt.Errorf("attest: opening the executable: %w", err)
	}
	f := os.NewFile(uintptr(fd), "exe")
	defer f.Close()
	before, err := fileExeKey(fd)
	if err != nil {
		return "", err
	}
	if before != key {
		return "", errors.New("attest: the executable changed since it was attested")
	}
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", fmt.Errorf("attest: hashing the executable: %w", err)
	}
	after, err := fileExeKey(fd)
	if err != nil {
		return "", err
	}
	if after != key {
		return "", errors.New("attest: the executable changed while it was hashed")
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

func exeKeyAt(dir int) (exeKey, error) {
	fd, err := unix.Openat(dir, "exe", unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return exeKey{}, fmt.Errorf("attest: opening the executable: %w", err)
	}
	defer unix.Close(fd)
	return fileExeKey(fd)
}

func fileExeKey(fd int) (exeKey, error) {
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return exeKey{}, fmt.Errorf("attest: stat of the executable: %w", err)
	}
	return exeKey{
		FileID:    FileID{Dev: st.Dev, Ino: st.Ino},
		Size:      st.Size,
		MtimeNsec: st.Mtim.Nano(),
		CtimeNsec: st.Ctim.Nano(),
	}, nil
}

// statFileID names the file at path (following links) by device and inode.
func statFileID(path string) (FileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		return FileID{}, fmt.Errorf("attest: %w", err)
	}
	return FileID{Dev: st.Dev, Ino: st.Ino}, nil
}

func readAt(dir int, name string) ([]byte, error) {
	fd, err := unix.Openat(dir, name, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, fmt.Errorf("attest: opening %s: %w", name, err)
	}
	f := os.NewFile(uintptr(fd), name)
	defer f.Close()
	b, err := io.ReadAll(io.LimitReader(f, 1<<20))
	if err != nil {
		return nil, fmt.Errorf("attest: reading %s: %w", name, err)
	}
	return b, nil
}

func readlinkAt(dir int, name string) (string, error) {
	buf := make([]byte, 4096)
	n, err := unix.Readlinkat(dir, name, buf)
	if err != nil {
		return "", err
	}
	if n == len(buf) {
		return "", fmt.Errorf("attest: %s: link target too long", name)
	}
	return string(buf[:n]), nil
}

// statusID returns the real id of a /proc/PID/status "Uid:" or "Gid:" line.
func statusID(status []byte, key string) (uint32, error) {
	for line := range strings.SplitSeq(string(status), "\n") {
		if v, ok := strings.CutPrefix(line, key); ok {
			f := strings.Fields(v)
			if len(f) == 0 {
				break
			}
			id, err := strconv.ParseUint(f[0], 10, 32)
			if err != nil {
				return 0, fmt.Errorf("attest: status %s %q: %w", key, f[0], err)
			}
			return uint32(id), nil
		}
	}
	return 0, fmt.Errorf("attest: status has no %s line", key)
}

type procStat struct {
	state byte
	start uint64
}

func readStat(dir int) (procStat, error) {
	b, err := readAt(dir, "stat")
	if err != nil {
		return procStat{}, err
	}
	return parseStat(b)
}

// parseStat reads the state (field 3) and start time (field 22) of a
// /proc/PID/stat line. The command name (field 2) is in parentheses and may
// hold spaces and parentheses: fields start after the last ')'.
func parseStat(b []byte) (procStat, error) {
	i := bytes.LastIndexByte(b, ')')
	if i < 0 {
		return procStat{}, errors.New("attest: malformed stat")
	}
	f := strings.Fields(string(b[i+1:]))
	// f[0] is field 3 (state), so field 22 is f[19].
	if len(f) < 20 || len(f[0]) != 1 {
		return procStat{}, errors.New("attest: malformed stat")
	}
	start, err := strconv.ParseUint(f[19], 10, 64)
	if err != nil {
		return procStat{}, fmt.Errorf("attest: stat start time: %w", err)
	}
	return procStat{state: f[0][0], start: start}, nil
}
