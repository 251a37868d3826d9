//go:build !linux

package journal

import (
	"errors"
	"os"
)

// fileID names a file by device and inode.
type fileID struct{ dev, ino uint64 }

var errNoWALIndex = errors.New("reading the wal-index is implemented on Linux only")

func idOf(string) (fileID, error)       { return fileID{}, errNoWALIndex }
func fileIDOf(*os.File) (fileID, error) { return fileID{}, errNoWALIndex }
func liveShm(*os.File) error            { return errNoWALIndex }
