package journal

import (
	"errors"
	"io"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

// fileID names a file by device and inode.
type fileID struct{ dev, ino uint64 }

func idOf(name string) (fileID, error) {
	var st unix.Stat_t
	if err := unix.Stat(name, &st); err != nil {
		return fileID{}, &os.PathError{Op: "stat", Path: name, Err: err}
	}
	return fileID{uint64(st.Dev), st.Ino}, nil
}

func fileIDOf(f *os.File) (fileID, error) {
	fi, err := f.Stat()
	if err != nil {
		return fileID{}, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fileID{}, errors.New("no device and inode")
	}
	return fileID{uint64(st.Dev), st.Ino}, nil
}

// shmDMS is the byte of the wal-index file on which every SQLite
// connection with the index mapped holds a shared lock (UNIX_SHM_DMS in
// SQLite's os_unix.c: 120 + SQLITE_SHM_NLOCK).
const shmDMS = 128

// liveShm checks that some SQLite connection holds its lock on f's DMS
// byte. An open-file-description lock query sees the POSIX locks of this
// process too, and, unlike F_GETLK, takes no lock and drops none.
func liveShm(f *os.File) error {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: io.SeekStart, Start: shmDMS, Len: 1}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		return &os.PathError{Op: "fcntl", Path: f.Name(), Err: err}
	}
	if lk.Type == unix.F_UNLCK {
		return errors.New(f.Name() + " is not locked by SQLite: not the database's wal-index")
	}
	return nil
}
