package connlimit

import (
	"bytes"
	"runtime"
	"sync"
	"testing"

	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/structpb"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// TestSharedCodecSendsUnknownFieldsByReference: a message's unknown
// fields go out as the very bytes the message holds (no copy per stream),
// and the whole encoding is byte for byte what protobuf writes; a message
// without them is encoded by grpc-go's codec.
func TestSharedCodecSendsUnknownFieldsByReference(t *testing.T) {
	c := newSharedCodec(false)
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

// TestDecodeAsideKeepsTheCallersStack: with decodeAside, the goroutine
// that asks for a message decoded (a stream's receiving goroutine, alive
// as long as its client) does not grow its stack by the decoding, so it
// does not keep a deep message's stack while it waits for the next one.
// Goroutines that each decode a deeply nested message, then park, hold
// that much more stack when the codec decodes in place.
func TestDecodeAsideKeepsTheCallersStack(t *testing.T) {
	// A Value nested 400 lists deep: protobuf decodes it recursively,
	// hundreds of kilobytes of stack.
	v := structpb.NewStringValue("leaf")
	for range 400 {
		v = structpb.NewListValue(&structpb.ListValue{Values: []*structpb.Value{v}})
	}
	wire, err := proto.Marshal(v)
	if err != nil {
		t.Fatal(err)
	}
	const parked = 16
	// held returns how much more stack the goroutines hold, parked after
	// decoding, than before they started.
	held := func(decodeAside bool) int64 {
		c := newSharedCodec(decodeAside)
		var ms runtime.MemStats
		runtime.GC()
		runtime.ReadMemStats(&ms)
		before := int64(ms.StackInuse)
		var decoded sync.WaitGroup
		release := make(chan struct{})
		var gone sync.WaitGroup
		errs := make(chan error, parked)
		for range parked {
			decoded.Add(1)
			gone.Add(1)
			go func() {
				defer gone.Done()
				out := &structpb.Value{}
				errs <- c.Unmarshal(mem.BufferSlice{mem.SliceBuffer(wire)}, out)
				decoded.Done()
				<-release
			}()
		}
		decoded.Wait()
		runtime.ReadMemStats(&ms)
		after := int64(ms.StackInuse)
		close(release)
		gone.Wait()
		for range parked {
			if err := <-errs; err != nil {
				t.Fatalf("decodeAside %v: %v", decodeAside, err)
			}
		}
		return after - before
	}
	inPlace, aside := held(false), held(true)
	t.Logf("stack held by %d parked goroutines: %d kB decoding in place, %d kB decoding aside", parked, inPlace>>10, aside>>10)
	// Decoding in place leaves each goroutine at least 128 KiB of stack.
	if inPlace < parked*128<<10 {
		t.Fatalf("decoding in place held only %d kB: the message is not deep enough to tell", inPlace>>10)
	}
	if aside > inPlace/8 {
		t.Fatalf("decoding aside, the parked goroutines hold %d kB of stack (in place: %d kB), want their decoding's stack freed", aside>>10, inPlace>>10)
	}
}
