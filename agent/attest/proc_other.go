//go:build !linux

package attest

import (
	"context"
	"net"
)

func newPeer(*transport, net.Conn) (*Peer, error) { return nil, ErrUnsupported }

func (p *Peer) release() {}

// Alive is false where peers cannot be attested.
func (p *Peer) Alive() bool { return false }

// Attest fails where peers cannot be attested.
func (p *Peer) Attest(context.Context) (*Caller, error) { return nil, ErrUnsupported }

func (p *Peer) hashExe(exeKey) (string, error) { return "", ErrUnsupported }

func statFileID(string) (FileID, error) { return FileID{}, ErrUnsupported }
