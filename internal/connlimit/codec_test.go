package connlimit

import (
	"bytes"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestSharedCodecSendsUnknownFieldsByReference: a message's unknown
// fields go out as the very bytes the message holds (no copy per stream),
// and the whole encoding is byte for byte what protobuf writes; a message
// without them is encoded by grpc-go's codec.
func TestSharedCodecSendsUnknownFieldsByReference(t *testing.T) {
	c := newSharedCodec()
	if c.Name() != "proto" {
		t.Fatalf("codec name %q, want proto (the content-subtype clients send)", c.Name())
	}
	shared := protowire.AppendTag(nil, 2, protowire.BytesType)
	shared = protowire.AppendBytes(shared, bytes.Repeat([]byte("x"), 64<<10))
	m := wrapperspb.String("the stream's own")
	m.ProtoReflect().SetUnknown(shared)

	out, err := c.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	want, err := proto.Marshal(m)
	if err != nil {
		t.Fatal(err)
	}
	if got := out.Materialize(); !bytes.Equal(got, want) {
		t.Fatalf("encoded %d bytes that differ from protobuf's %d", len(got), len(want))
	}
	aliased := false
	for _, b := range out {
		if d := b.ReadOnlyData(); len(d) == len(shared) && &d[0] == &shared[0] {
			aliased = true
		}
	}
	if !aliased {
		t.Fatal("the unknown fields were copied, want them sent by reference")
	}
	out.Free()
	if !bytes.Equal(m.ProtoReflect().GetUnknown(), shared) || m.GetValue() != "the stream's own" {
		t.Fatal("marshaling changed the message")
	}

	plain := wrapperspb.String("plain")
	out, err = c.Marshal(plain)
	if err != nil {
		t.Fatal(err)
	}
	want, _ = proto.Marshal(plain)
	if got := out.Materialize(); !bytes.Equal(got, want) {
		t.Fatalf("plain message encoded as %x, want %x", got, want)
	}
	out.Free()

	back := &wrapperspb.StringValue{}
	if err := c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(want)}, back); err != nil || back.GetValue() != "plain" {
		t.Fatalf("Unmarshal = %v, %q", err, back.GetValue())
	}
}
