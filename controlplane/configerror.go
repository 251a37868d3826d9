package controlplane

import "errors"

// ConfigError is one thing wrong with Config: the group at fault (its field
// in Config, for callers that branch on it) and, when one flag sets the
// setting at fault, that flag's name, which the message leads with, since
// that is what a user typed. Validate joins one per problem.
type ConfigError struct {
	Group string
	// Flag is the serve flag that sets the setting at fault, without its
	// dashes ("listen-ca"); empty when no one flag does.
	Flag string
	Err  error
}

func (e *ConfigError) Error() string {
	if e.Flag != "" {
		return "--" + e.Flag + ": " + e.Err.Error()
	}
	if name, ok := groupNames[e.Group]; ok {
		return name + ": " + e.Err.Error()
	}
	return e.Err.Error()
}

func (e *ConfigError) Unwrap() error { return e.Err }

// groupNames are the groups as messages name them when no one flag is at
// fault.
var groupNames = map[string]string{
	"Listen": "listeners", "CA": "CA", "Journal": "journal", "Rotation": "CA rotation",
	"Authz": "authorization", "XDS": "xDS", "Injector": "injector",
}

// setting marks err as the fault of the setting that flag sets.
func setting(flag string, err error) error {
	if err == nil {
		return nil
	}
	return &ConfigError{Flag: flag, Err: err}
}

// inGroup puts every error in group: each becomes one *ConfigError, the
// setting it names kept.
func inGroup(group string, errs ...error) error {
	var out []error
	for _, err := range errs {
		if err == nil {
			continue
		}
		if ce, ok := err.(*ConfigError); ok {
			ce.Group = group
			out = append(out, ce)
			continue
		}
		out = append(out, &ConfigError{Group: group, Err: err})
	}
	return errors.Join(out...)
}
