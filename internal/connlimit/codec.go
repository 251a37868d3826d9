package connlimit

import (
	"fmt"

	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	protov2 "google.golang.org/protobuf/proto"
)

// sharedCodec is grpc-go's proto codec, except for a message that carries
// unknown fields: their bytes are sent by reference, not copied into a
// buffer of the stream's own. A server that sends thousands of streams
// the same large, already encoded content (the xDS server's first
// configurations: a megabyte each at a thousand services) puts it in a
// response's unknown fields once and every stream's message shares it
// until the transport has written it. The bytes on the wire are what
// grpc-go's codec writes for the same message: the known fields, then
// the unknown ones verbatim (protobuf's own order).
//
// With decodeAside, a message is decoded on a goroutine of its own, which
// ends with the decoding. A stream's receiving goroutine lives as long as
// its client stays connected (an xDS proxy's: for days), and the Go
// runtime never gives back the stack it grew to while parked shallow:
// a collection halves a stack only while less than a quarter of it is in
// use. Decoding a proxy's node (nested metadata) is the deepest thing
// that goroutine does; done aside, the goroutine keeps the stack of its
// wait, and the decoding's stack is freed when it ends.
type sharedCodec struct {
	base        encoding.CodecV2
	decodeAside bool
}

func newSharedCodec(decodeAside bool) sharedCodec {
	return sharedCodec{base: encoding.GetCodecV2(proto.Name), decodeAside: decodeAside}
}

// Name is the proto codec's: clients see application/grpc+proto as ever.
func (c sharedCodec) Name() string { return proto.Name }

func (c sharedCodec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(protov2.Message)
	if !ok {
		return c.base.Marshal(v)
	}
	r := m.ProtoReflect()
	shared := r.GetUnknown()
	if len(shared) == 0 {
		return c.base.Marshal(v)
	}
	// The known fields alone: the message's unknown fields are set
	// aside while it is marshaled, and put back. A message is sent by the
	// goroutine of its one stream, which waits here, so nothing else
	// reads it meanwhile (go-control-plane sets each response's nonce
	// before sending it, which already makes a response one stream's).
	r.SetUnknown(nil)
	head, err := protov2.Marshal(m)
	r.SetUnknown(shared)
	if err != nil {
		return nil, fmt.Errorf("connlimit: marshaling %s: %w", r.Descriptor().FullName(), err)
	}
	// SliceBuffer's Free does nothing: the shared bytes stay the
	// message's, and no pool ever gets them back.
	return mem.BufferSlice{mem.SliceBuffer(head), mem.SliceBuffer(shared)}, nil
}

func (c sharedCodec) Unmarshal(data mem.BufferSlice, v any) (err error) {
	if !c.decodeAside {
		return c.base.Unmarshal(data, v)
	}
	done := make(chan struct{})
	go func() {
		defer close(done)
		err = c.base.Unmarshal(data, v)
	}()
	<-done
	return err
}
