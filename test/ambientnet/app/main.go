// Command app is the unmodified TCP application of the ambientnet tests: it
// knows nothing of the mesh, and runs in a pod's network namespace.
//
//	app serve -name NAME -http :8080 -echo :9000   an HTTP server and a TCP echo
//	app send -addr HOST:PORT -data TEXT            one exchange with an echo; prints the answer
//	app hold -addr HOST:PORT -interval 200ms       keeps one connection, a line per exchange,
//	                                               until it breaks (exit 1) or -for ends (exit 0)
//
// and, for the wrong-identity test, one program that is not an app:
//
//	app impostor -socket PATH -listen :15008       fetches its SVID from the node's socket and
//	                                               serves HBONE with it, logging every connection
package main

import (
	"bufio"
	"context"
	"crypto/tls"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/workloadapi"

	"github.com/trustmesh/trustmesh/agent/hbone"
)

func main() {
	if len(os.Args) < 2 {
		fmt.Fprintln(os.Stderr, "usage: app serve|send|hold|impostor [flags]")
		os.Exit(2)
	}
	var err error
	switch os.Args[1] {
	case "serve":
		err = serve(os.Args[2:])
	case "send":
		err = send(os.Args[2:])
	case "hold":
		err = hold(os.Args[2:])
	case "bench":
		err = bench(os.Args[2:])
	case "impostor":
		err = impostor(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "app:", err)
		os.Exit(1)
	}
}

func serve(args []string) error {
	fs := flag.NewFlagSet("serve", flag.ExitOnError)
	name := fs.String("name", "app", "what / answers with")
	httpAddr := fs.String("http", ":8080", "HTTP address")
	echoAddr := fs.String("echo", ":9000", "TCP echo address")
	sinkAddr := fs.String("sink", ":9001", "TCP sink address: reads to EOF, answers the count")
	_ = fs.Parse(args)
	hl, err := net.Listen("tcp", *httpAddr)
	if err != nil {
		return err
	}
	el, err := net.Listen("tcp", *echoAddr)
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := el.Accept()
			if err != nil {
				return
			}
			go func() { defer c.Close(); _, _ = io.Copy(c, c) }()
		}
	}()
	sl, err := net.Listen("tcp", *sinkAddr)
	if err != nil {
		return err
	}
	go func() {
		for {
			c, err := sl.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				n, _ := io.Copy(io.Discard, c)
				_, _ = fmt.Fprintf(c, "%d\n", n)
			}()
		}
	}()
	fmt.Println("serving")
	mux := http.NewServeMux()
	mux.HandleFunc("/", func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, "hello from %s to %s\n", *name, r.RemoteAddr)
	})
	return http.Serve(hl, mux)
}

func send(args []string) error {
	fs := flag.NewFlagSet("send", flag.ExitOnError)
	addr := fs.String("addr", "", "echo address")
	data := fs.String("data", "", "what to send")
	timeout := fs.Duration("timeout", 5*time.Second, "give up after")
	_ = fs.Parse(args)
	c, err := net.DialTimeout("tcp", *addr, *timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	_ = c.SetDeadline(time.Now().Add(*timeout))
	if _, err := io.WriteString(c, *data); err != nil {
		return err
	}
	buf := make([]byte, len(*data))
	if _, err := io.ReadFull(c, buf); err != nil {
		return err
	}
	fmt.Print(string(buf))
	return nil
}

func hold(args []string) error {
	fs := flag.NewFlagSet("hold", flag.ExitOnError)
	addr := fs.String("addr", "", "echo address")
	interval := fs.Duration("interval", 200*time.Millisecond, "between exchanges")
	total := fs.Duration("for", time.Minute, "how long to hold")
	_ = fs.Parse(args)
	c, err := net.DialTimeout("tcp", *addr, 5*time.Second)
	if err != nil {
		return err
	}
	defer c.Close()
	r := bufio.NewReader(c)
	end := time.Now().Add(*total)
	for i := 0; time.Now().Before(end); i++ {
		_ = c.SetDeadline(time.Now().Add(5 * time.Second))
		msg := fmt.Sprintf("ping %d\n", i)
		if _, err := io.WriteString(c, msg); err != nil {
			return fmt.Errorf("exchange %d: %w", i, err)
		}
		got, err := r.ReadString('\n')
		if err != nil {
			return fmt.Errorf("exchange %d: %w", i, err)
		}
		if got != msg {
			return fmt.Errorf("exchange %d: echoed %q", i, got)
		}
		fmt.Printf("ok %d\n", i)
		time.Sleep(*interval)
	}
	return nil
}

// impostor serves HBONE with whatever SVID its node gives it: a peer that
// expects another identity at its address must refuse it.
func impostor(args []string) error {
	fs := flag.NewFlagSet("impostor", flag.ExitOnError)
	socket := fs.String("socket", "", "the node agent's Workload API socket")
	listen := fs.String("listen", ":15008", "HBONE address")
	_ = fs.Parse(args)
	ctx := context.Background()
	fctx, cancel := context.WithTimeout(ctx, 30*time.Second)
	defer cancel()
	src, err := workloadapi.NewX509Source(fctx, workloadapi.WithClientOptions(workloadapi.WithAddr("unix://"+*socket)))
	if err != nil {
		return fmt.Errorf("fetching an SVID: %w", err)
	}
	svid, err := src.GetX509SVID()
	if err != nil {
		return err
	}
	l, err := net.Listen("tcp", *listen)
	if err != nil {
		return err
	}
	fmt.Printf("impostor serving as %s\n", svid.ID)
	return hbone.Serve(ctx, logListener{l}, hbone.ServerConfig{
		Cert: func(*tls.ClientHelloInfo) (*tls.Certificate, error) {
			s, err := src.GetX509SVID()
			if err != nil {
				return nil, err
			}
			c := &tls.Certificate{PrivateKey: s.PrivateKey}
			for _, x := range s.Certificates {
				c.Certificate = append(c.Certificate, x.Raw)
			}
			return c, nil
		},
		Bundle: src,
		Accept: func(_ context.Context, peer spiffeid.ID, authority string, _ net.Addr) error {
			fmt.Printf("tunnel from %s to %s\n", peer, authority)
			return nil
		},
		Handle: func(_ context.Context, t *hbone.Tunnel) {
			_, _ = io.WriteString(t, "impostor\n")
			_ = t.Close()
		},
		HandshakeFailed: func(remote net.Addr, err error) {
			fmt.Printf("handshake failed from %s: %s\n", remote, strings.ReplaceAll(err.Error(), "\n", " "))
		},
	})
}

type logListener struct{ net.Listener }

func (l logListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err == nil {
		fmt.Printf("connection from %s\n", c.RemoteAddr())
	} else if !errors.Is(err, net.ErrClosed) {
		fmt.Printf("accept: %v\n", err)
	}
	return c, err
}
