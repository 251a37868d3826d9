package controlplane

import (
	"fmt"
	"net"
	"strings"
)

func (c *ListenConfig) setDefaults() {
	if c.CA == "" {
		c.CA = DefaultListenCA
	}
	if c.Monitoring == "" {
		c.Monitoring = DefaultListenMonitoring
	}
	if c.Authz == "" {
		c.Authz = DefaultListenAuthz
	}
	if c.Injector == "" {
		c.Injector = DefaultListenInjector
	}
}

func (c *ListenConfig) check() []error {
	var errs []error
	for _, l := range []struct {
		flag, addr string
		off        bool // the listener is off
	}{
		{"listen-ca", c.CA, false},
		{"listen-monitoring", c.Monitoring, false},
		{"listen-bundle", c.Bundle, c.Bundle == ""},
		{"listen-authz", c.Authz, c.Authz == "off" || strings.HasPrefix(c.Authz, "unix://")},
		{"listen-injector", c.Injector, c.Injector == "off"},
	} {
		if !l.off {
			errs = append(errs, setting(l.flag, checkAddress(l.addr)))
		}
	}
	return append(errs, c.Connections.Validate())
}

// checkAddress checks a TCP listen address: host:port, the port a number
// from 0 to 65535 or a service name.
func checkAddress(addr string) error {
	_, port, err := net.SplitHostPort(addr)
	if err == nil {
		_, err = net.LookupPort("tcp", port)
	}
	if err != nil {
		return fmt.Errorf("listen address %q: %w", addr, err)
	}
	return nil
}

// bindAll binds every port this control plane serves on, so that a port in
// use fails the start before anything is created. The authorization
// service and the injector bind their own listeners later; their ports are
// held in cp.reserved until then.
func (cp *ControlPlane) bindAll(v *validated) error {
	var err error
	if cp.caLis, err = listen(v, v.Listen.CA, "listen-ca", "the CA and xDS port"); err != nil {
		return err
	}
	if cp.monLis, err = listen(v, v.Listen.Monitoring, "listen-monitoring", "the monitoring port"); err != nil {
		return err
	}
	if v.Listen.Bundle != "" {
		if cp.bundleLis, err = listen(v, v.Listen.Bundle, "listen-bundle", "the bundle endpoint"); err != nil {
			return err
		}
	}
	if v.authzOn() && !strings.HasPrefix(v.Listen.Authz, "unix://") {
		if cp.reserved["listen-authz"], err = listen(v, v.Listen.Authz, "listen-authz", "the ext_authz port"); err != nil {
			return err
		}
	}
	if v.injectorOn() {
		if cp.reserved["listen-injector"], err = listen(v, v.Listen.Injector, "listen-injector", "the injector webhook"); err != nil {
			return err
		}
	}
	return nil
}

// release closes a reserved port so that its server can bind it.
func (cp *ControlPlane) release(flag string) {
	if l := cp.reserved[flag]; l != nil {
		_ = l.Close()
		delete(cp.reserved, flag)
	}
}

func listen(v *validated, addr, flag, what string) (net.Listener, error) {
	l, err := v.Listen.Connections.Listen("tcp", addr)
	if err != nil {
		return nil, &ConfigError{Group: "Listen", Flag: flag, Err: fmt.Errorf("%s: %w", what, err)}
	}
	return l, nil
}
