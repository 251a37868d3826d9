package proxyconfig

import (
	"errors"
	"fmt"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/types/known/anypb"
)

// ErrInvalidResource marks a resource that fails its proto's validation.
var ErrInvalidResource = errors.New("proxyconfig: invalid resource")

type validatorAll interface{ ValidateAll() error }

// Validate runs ValidateAll on a resource and on every message packed in
// an Any inside it (ValidateAll stops at Any), so that typed filter and
// transport socket configs are checked too. An Any whose type is unknown
// is an error.
func Validate(m proto.Message) error {
	if err := validateMessage(m.ProtoReflect()); err != nil {
		return fmt.Errorf("%w: %T: %w", ErrInvalidResource, m, err)
	}
	return nil
}

func validateMessage(m protoreflect.Message) error {
	if v, ok := m.Interface().(validatorAll); ok {
		if err := v.ValidateAll(); err != nil {
			return err
		}
	}
	return walk(m)
}

// walk finds the Any values below m and validates what they hold.
func walk(m protoreflect.Message) error {
	if a, ok := m.Interface().(*anypb.Any); ok {
		inner, err := a.UnmarshalNew()
		if err != nil {
			return fmt.Errorf("%s: %w", a.GetTypeUrl(), err)
		}
		if err := validateMessage(inner.ProtoReflect()); err != nil {
			return fmt.Errorf("%s: %w", a.GetTypeUrl(), err)
		}
		return nil
	}
	var err error
	m.Range(func(fd protoreflect.FieldDescriptor, v protoreflect.Value) bool {
		switch {
		case fd.IsList() && fd.Kind() == protoreflect.MessageKind:
			l := v.List()
			for i := 0; i < l.Len() && err == nil; i++ {
				err = walk(l.Get(i).Message())
			}
		case fd.IsMap() && fd.MapValue().Kind() == protoreflect.MessageKind:
			v.Map().Range(func(_ protoreflect.MapKey, mv protoreflect.Value) bool {
				err = walk(mv.Message())
				return err == nil
			})
		case !fd.IsList() && !fd.IsMap() && fd.Kind() == protoreflect.MessageKind:
			err = walk(v.Message())
		}
		return err == nil
	})
	return err
}

// ValidateAll validates every resource.
func (r *Resources) ValidateAll() error {
	var errs []error
	for _, rs := range r.ByType() {
		for _, x := range rs {
			if err := Validate(x); err != nil {
				errs = append(errs, err)
			}
		}
	}
	return errors.Join(errs...)
}
