package capture

import (
	"fmt"
	"sort"
	"strings"
)

// chainPrefix names trustmesh's own chains; nothing else is touched.
const chainPrefix = "TRUSTMESH_"

// chain is one of trustmesh's chains and the built-in chain that jumps to it.
type chain struct {
	table, name, hook string
	rules             []string
}

// chains is what r installs in one address family, in a fixed order.
func (r Rules) chains() []chain {
	mark := fmt.Sprintf("%#x", r.Mark)
	tmark := fmt.Sprintf("%#x/%#x", TPROXYMark, TPROXYMask)
	out := []chain{{table: "nat", name: chainPrefix + "OUTPUT", hook: "OUTPUT", rules: []string{
		"-o lo -j RETURN",
		"-m mark --mark " + mark + " -j RETURN",
		fmt.Sprintf("-p tcp -j REDIRECT --to-ports %d", r.Outbound),
	}}}
	if !r.TPROXY {
		return append(out, chain{table: "nat", name: chainPrefix + "PREROUTING", hook: "PREROUTING", rules: []string{
			"-i lo -j RETURN",
			fmt.Sprintf("-p tcp -m tcp --dport %d -j RETURN", r.HBONE),
			fmt.Sprintf("-p tcp -j REDIRECT --to-ports %d", r.InboundPlaintext),
		}})
	}
	return append(out,
		chain{table: "mangle", name: chainPrefix + "PREROUTING", hook: "PREROUTING", rules: []string{
			// The proxy's transparent connections to the application: the
			// replies must come back to it (see RouteTable).
			"-i lo -m mark --mark " + mark + " -j CONNMARK --set-xmark " + tmark,
			"-i lo -j RETURN",
			fmt.Sprintf("-p tcp -m tcp --dport %d -j RETURN", r.HBONE),
			// Replies to connections the proxy made from this namespace.
			"-p tcp -m conntrack --ctstate RELATED,ESTABLISHED -j RETURN",
			fmt.Sprintf("-p tcp -j TPROXY --on-port %d --tproxy-mark %s", r.InboundPlaintext, tmark),
		}},
		chain{table: "mangle", name: chainPrefix + "OUTPUT", hook: "OUTPUT", rules: []string{
			fmt.Sprintf("-m connmark --mark %s -j CONNMARK --restore-mark --nfmask %#x --ctmask %#x", tmark, TPROXYMask, TPROXYMask),
		}},
	)
}

// saved is what iptables-save shows of trustmesh's chains: per table, the
// chains that exist and the rules (as "-A ..." without the "-A ") of other
// chains that jump to them.
type saved struct {
	chains map[string]map[string]bool
	jumps  map[string][]string
}

// parseSave reads iptables-save output.
func parseSave(out string) (saved, error) {
	s := saved{chains: map[string]map[string]bool{}, jumps: map[string][]string{}}
	table := ""
	for _, line := range strings.Split(out, "\n") {
		line = strings.TrimSpace(line)
		switch {
		case line == "" || strings.HasPrefix(line, "#"):
		case strings.HasPrefix(line, "*"):
			table = line[1:]
		case line == "COMMIT":
			table = ""
		case table == "":
			return saved{}, fmt.Errorf("capture: iptables-save: %q outside a table", line)
		case strings.HasPrefix(line, ":"):
			name, _, _ := strings.Cut(line[1:], " ")
			if strings.HasPrefix(name, chainPrefix) {
				if s.chains[table] == nil {
					s.chains[table] = map[string]bool{}
				}
				s.chains[table][name] = true
			}
		case strings.HasPrefix(line, "-A "):
			spec := line[len("-A "):]
			in, _, _ := strings.Cut(spec, " ")
			f := strings.Fields(spec)
			for i := 0; i+1 < len(f); i++ {
				if (f[i] == "-j" || f[i] == "-g") && strings.HasPrefix(f[i+1], chainPrefix) && !strings.HasPrefix(in, chainPrefix) {
					s.jumps[table] = append(s.jumps[table], spec)
				}
			}
		}
	}
	return s, nil
}

// restoreInput is the iptables-restore --noflush input that turns the state
// cur into the chains want: every jump to a trustmesh chain is deleted, the
// chains are rewritten (or removed when not wanted) and the jumps put back
// first in their built-in chains, one transaction per table. Tables with
// nothing to do are left out; "" means nothing to do.
func restoreInput(want []chain, cur saved) string {
	tables := map[string]bool{}
	for _, c := range want {
		tables[c.table] = true
	}
	for t := range cur.chains {
		tables[t] = true
	}
	for t := range cur.jumps {
		tables[t] = true
	}
	names := make([]string, 0, len(tables))
	for t := range tables {
		names = append(names, t)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, t := range names {
		var mine []chain
		wanted := map[string]bool{}
		for _, c := range want {
			if c.table == t {
				mine = append(mine, c)
				wanted[c.name] = true
			}
		}
		fmt.Fprintf(&b, "*%s\n", t)
		for _, c := range mine {
			fmt.Fprintf(&b, ":%s - [0:0]\n", c.name)
		}
		for _, j := range cur.jumps[t] {
			fmt.Fprintf(&b, "-D %s\n", j)
		}
		stale := make([]string, 0, len(cur.chains[t]))
		for name := range cur.chains[t] {
			if !wanted[name] {
				stale = append(stale, name)
			}
		}
		sort.Strings(stale)
		for _, name := range stale {
			fmt.Fprintf(&b, "-F %s\n-X %s\n", name, name)
		}
		for _, c := range mine {
			fmt.Fprintf(&b, "-F %s\n", c.name)
			for _, r := range c.rules {
				fmt.Fprintf(&b, "-A %s %s\n", c.name, r)
			}
		}
		for _, c := range mine {
			fmt.Fprintf(&b, "-I %s 1 -j %s\n", c.hook, c.name)
		}
		b.WriteString("COMMIT\n")
	}
	return b.String()
}
