// Package attest tells apart the local processes that call a server on a
// unix socket, race-free: it is how the node agent's one Workload API socket
// hands each workload its own identity and nothing else.
//
// # How a caller is identified
//
// Credentials are gRPC transport credentials for a unix listener. Their
// handshake pins the peer process at once:
//
//   - With SO_PEERPIDFD (Linux 6.5 and later) the kernel hands over a pidfd
//     of the process that called connect(2). A pidfd names one process for
//     its whole life and never a later process that reuses its PID.
//   - Without it (or with Options.NoPidfd) the handshake takes SO_PEERCRED's
//     PID, opens /proc/PID as a directory fd at once and refuses the peer if
//     that process started after the handshake began: its PID was reused. A
//     /proc/PID directory fd keeps naming the process it was opened for; once
//     that process is gone every read through it fails.
//
// Peer.Attest then reads the process's real uid and gid, its executable
// (/proc/PID/exe), its cgroup (pod UID and container ID, see ParseCgroup) and
// its network namespace, all through that pinned handle, and only then
// confirms that the process is still alive and the same (pidfd: not exited;
// fallback: /proc/PID/stat still readable through the directory fd, not a
// zombie, same start time). A caller whose process has exited is refused, so
// a connection handed to another process (fd passing, fork) and a PID reused
// after the workload exited never inherit the workload's identity.
// Caller.Matches compares the attested attributes with an entry's selectors;
// an unknown selector type and an empty selector list never match.
//
// # Limits
//
//   - The identity is that of the process that connected. A process that
//     hands its open connection to another process while it stays alive
//     lends it its identity, as with any credential it holds; the caller must
//     exit for the connection to stop working.
//   - The SO_PEERCRED fallback detects a PID reused after the handshake
//     began, to the granularity of a clock tick (10 ms); it cannot detect a
//     peer that exited and whose PID was reused between connect(2) and the
//     handshake. Kernels with SO_PEERPIDFD have no such window.
//   - PIDs are those of the reader's PID namespace: the node agent must share
//     the workloads' PID namespace (hostPID on Kubernetes) and read a /proc
//     mounted for it. A peer in a PID namespace the agent cannot see is
//     refused.
//   - The executable path is the kernel's path of the file the process runs,
//     in the process's own mount namespace: a container's path names a file
//     of the container's image, which its owner chooses, and any user can
//     make a user and mount namespace and bind a program of theirs over any
//     path. So unix:path: and unix:sha256: match only a process in the node
//     agent's own mount namespace (Caller.HostMounts), and an entry should
//     pair them with unix:uid: or unix:gid: (the mesh file requires it). A
//     replaced or deleted binary no longer matches ("(deleted)"). The
//     SHA-256 is computed over the running file through /proc/PID/exe, not a
//     path re-opened by name, and is cached by device, inode, size, mtime
//     and ctime; a binary changed in place changes the ctime.
//   - uid and gid are the process's real ids when it is attested, not when it
//     connected; a process that changes its ids between is attested with the
//     new ones.
//   - A process in a pod's cgroup is that pod's: whoever can move processes
//     between cgroups (root on the node) can claim a pod's identity, as
//     whoever is root on the node can read the node agent's memory.
//   - A pod's cgroup is recognised only where the kubelet makes it (see
//     ParseCgroupUnder), never by its name inside another subtree, so a user
//     given a cgroup subtree of its own cannot claim a pod. The node agent
//     itself must not run in a subtree delegated to others.
package attest
