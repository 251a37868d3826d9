package main

import (
	"errors"
	"fmt"

	discoveryv3 "github.com/envoyproxy/go-control-plane/envoy/service/discovery/v3"
	"github.com/envoyproxy/go-control-plane/pkg/resource/v3"
	"google.golang.org/grpc/encoding"
	"google.golang.org/grpc/encoding/proto"
	"google.golang.org/grpc/mem"
	"google.golang.org/protobuf/encoding/protowire"
	"google.golang.org/protobuf/types/known/anypb"
)

// envoyCodec is the simulated Envoys' gRPC codec. A simulated Envoy
// receives, decrypts and acknowledges every byte the server sends, but of
// a response it decodes only what it acts on: the version, type and nonce,
// and svc-0's ClusterLoadAssignment. Decoding the other 999 services' CDS,
// EDS and LDS resources into Go structs cost this tool a third of its CPU
// (pprof, 1,000 services), CPU that the server it measures shares on a
// small machine. Requests are encoded by grpc-go's proto codec.
type envoyCodec struct{ encoding.CodecV2 }

func newEnvoyCodec() envoyCodec { return envoyCodec{encoding.GetCodecV2(proto.Name)} }

var errTruncated = errors.New("xds-load: a response does not parse as protobuf")

func (c envoyCodec) Unmarshal(data mem.BufferSlice, v any) error {
	switch m := v.(type) {
	case *discoveryv3.DiscoveryResponse:
		// A pooled buffer: what is kept (svc-0) is copied out of it.
		buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
		defer buf.Free()
		return decodeSotw(buf.ReadOnlyData(), m)
	case *discoveryv3.DeltaDiscoveryResponse:
		buf := data.MaterializeToBuffer(mem.DefaultBufferPool())
		defer buf.Free()
		return decodeDelta(buf.ReadOnlyData(), m)
	}
	return c.CodecV2.Unmarshal(data, v)
}

// fields calls f with each field of a message; a bytes field's value is
// v, any other field's is nil.
func fields(b []byte, f func(num protowire.Number, v []byte)) error {
	for len(b) > 0 {
		num, typ, n := protowire.ConsumeTag(b)
		if n < 0 {
			return errTruncated
		}
		b = b[n:]
		if typ == protowire.BytesType {
			v, n := protowire.ConsumeBytes(b)
			if n < 0 {
				return errTruncated
			}
			f(num, v)
			b = b[n:]
			continue
		}
		if n = protowire.ConsumeFieldValue(num, typ, b); n < 0 {
			return errTruncated
		}
		b = b[n:]
	}
	return nil
}

// decodeSotw fills version_info (1), type_url (4) and nonce (5), and of
// the resources (2) only svc-0's ClusterLoadAssignment.
func decodeSotw(b []byte, m *discoveryv3.DiscoveryResponse) error {
	var res [][]byte
	err := fields(b, func(num protowire.Number, v []byte) {
		switch num {
		case 1:
			m.VersionInfo = string(v)
		case 2:
			res = append(res, v)
		case 4:
			m.TypeUrl = string(v)
		case 5:
			m.Nonce = string(v)
		}
	})
	if err != nil || m.TypeUrl != resource.EndpointType {
		return err
	}
	for _, r := range res {
		typeURL, value, err := decodeAny(r)
		if err != nil {
			return err
		}
		if claName(value) == svc0Cluster {
			m.Resources = append(m.Resources, &anypb.Any{TypeUrl: typeURL, Value: append([]byte(nil), value...)})
		}
	}
	return nil
}

// decodeDelta fills type_url (4), nonce (5), and svc-0 among the resources
// (2, named by field 3) and removed_resources (6).
func decodeDelta(b []byte, m *discoveryv3.DeltaDiscoveryResponse) error {
	var res [][]byte
	err := fields(b, func(num protowire.Number, v []byte) {
		switch num {
		case 1:
			m.SystemVersionInfo = string(v)
		case 2:
			res = append(res, v)
		case 4:
			m.TypeUrl = string(v)
		case 5:
			m.Nonce = string(v)
		case 6:
			if string(v) == svc0Cluster {
				m.RemovedResources = append(m.RemovedResources, string(v))
			}
		}
	})
	if err != nil || m.TypeUrl != resource.EndpointType {
		return err
	}
	for _, r := range res {
		out := &discoveryv3.Resource{}
		var body []byte
		if err := fields(r, func(num protowire.Number, v []byte) {
			switch num {
			case 3:
				out.Name = string(v)
			case 2:
				body = v
			}
		}); err != nil {
			return err
		}
		if out.Name != svc0Cluster {
			continue
		}
		if body != nil {
			typeURL, value, err := decodeAny(body)
			if err != nil {
				return err
			}
			out.Resource = &anypb.Any{TypeUrl: typeURL, Value: append([]byte(nil), value...)}
		}
		m.Resources = append(m.Resources, out)
	}
	return nil
}

// decodeAny is an Any's type URL and value, a view of b.
func decodeAny(b []byte) (typeURL string, value []byte, err error) {
	err = fields(b, func(num protowire.Number, v []byte) {
		switch num {
		case 1:
			typeURL = string(v)
		case 2:
			value = v
		}
	})
	if err != nil {
		return "", nil, fmt.Errorf("xds-load: a resource: %w", err)
	}
	return typeURL, value, nil
}
