package controlplane

import (
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
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
		{"listen-ui", c.UI, c.UI == "" || c.UI == "off"},
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

// port is one listener the control plane serves on.
type port struct{ flag, addr, what string }

// ports are the listeners this configuration serves on, in the order New
// binds them.
func (v *validated) ports() []port {
	ps := []port{
		{"listen-ca", v.Listen.CA, "the CA and xDS port"},
		{"listen-monitoring", v.Listen.Monitoring, "the monitoring port"},
	}
	if v.Listen.Bundle != "" {
		ps = append(ps, port{"listen-bundle", v.Listen.Bundle, "the bundle endpoint"})
	}
	if v.authzOn() {
		ps = append(ps, port{"listen-authz", v.Listen.Authz, "the ext_authz port"})
	}
	if v.injectorOn() {
		ps = append(ps, port{"listen-injector", v.Listen.Injector, "the admission webhooks (injection, validation)"})
	}
	if v.uiOn() {
		ps = append(ps, port{"listen-ui", v.Listen.UI, "the web UI"})
	}
	return ps
}

// bindAll binds every port this control plane serves on, and ext_authz's
// unix socket, so that a port in use fails the start before anything is
// created. The authorization service binds its own listener later, and
// the injector takes its bound one later; their ports are held in
// cp.reserved until then.
func (cp *ControlPlane) bindAll(v *validated) error {
	for _, p := range v.ports() {
		l, err := listen(v, p)
		if err != nil {
			return err
		}
		switch p.flag {
		case "listen-ca":
			cp.caLis = l
		case "listen-monitoring":
			cp.monLis = l
		case "listen-bundle":
			cp.bundleLis = l
		case "listen-ui":
			cp.uiLis = l
		default:
			if l != nil {
				cp.reserved[p.flag] = l
			}
		}
	}
	return nil
}

// checkPorts is bindAll for Check: it binds every port and releases it at
// once, and reports every one that cannot be bound.
func (v *validated) checkPorts() []error {
	var errs []error
	for _, p := range v.ports() {
		l, err := listen(v, p)
		if l != nil {
			_ = l.Close()
		}
		errs = append(errs, err)
	}
	return errs
}

// release closes a reserved port so that its server can bind it.
func (cp *ControlPlane) release(flag string) {
	if l := cp.reserved[flag]; l != nil {
		_ = l.Close()
		delete(cp.reserved, flag)
	}
}

func listen(v *validated, p port) (net.Listener, error) {
	network, addr := "tcp", p.addr
	if path, ok := strings.CutPrefix(p.addr, "unix://"); ok {
		network, addr = "unix", path
		if _, err := os.Lstat(path); err == nil {
			// A socket left by an earlier run, which the server
			// replaces when it binds: check only that it can.
			if err := syscall.Access(filepath.Dir(path), 2 /* W_OK */); err != nil {
				return nil, &ConfigError{Group: "Listen", Flag: p.flag, Err: fmt.Errorf("%s: %s: %w", p.what, filepath.Dir(path), err)}
			}
			return nil, nil
		}
	}
	l, err := v.Listen.Connections.Listen(network, addr)
	if err != nil {
		return nil, &ConfigError{Group: "Listen", Flag: p.flag, Err: fmt.Errorf("%s: %w", p.what, err)}
	}
	return l, nil
}
