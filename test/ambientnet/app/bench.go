package main

import (
	"bufio"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"os/signal"
	"sort"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// bench measures one thing against a server of `app serve` and prints it
// as one JSON line:
//
//	-mode tput  -addr HOST:9001 -bytes N   single-stream throughput into the sink
//	-mode rtt   -addr HOST:9000 -n N       round trips of -size bytes on one connection (p50, p99)
//	-mode setup -addr HOST:9000 -n N       connections opened, one byte echoed, closed, one after another
//	-mode hold  -addr HOST:9000 -n N       opens N connections, each echoing a byte, prints "held",
//	                                       and keeps them until SIGTERM
func bench(args []string) error {
	fs := flag.NewFlagSet("bench", flag.ExitOnError)
	mode := fs.String("mode", "", "tput, rtt, setup or hold")
	addr := fs.String("addr", "", "server address")
	total := fs.Int64("bytes", 256<<20, "tput: bytes to send")
	n := fs.Int("n", 1000, "rtt, setup, hold: how many")
	size := fs.Int("size", 64, "rtt: bytes per exchange")
	_ = fs.Parse(args)
	out := map[string]any{"mode": *mode}
	switch *mode {
	case "tput":
		c, err := net.Dial("tcp", *addr)
		if err != nil {
			return err
		}
		defer c.Close()
		buf := make([]byte, 64<<10)
		start := time.Now()
		var sent int64
		for sent < *total {
			w, err := c.Write(buf)
			if err != nil {
				return err
			}
			sent += int64(w)
		}
		if err := c.(*net.TCPConn).CloseWrite(); err != nil {
			return err
		}
		line, err := bufio.NewReader(c).ReadString('\n')
		if err != nil {
			return fmt.Errorf("sink's count: %w", err)
		}
		got, _ := strconv.ParseInt(strings.TrimSpace(line), 10, 64)
		if got != sent {
			return fmt.Errorf("sink counted %d of %d bytes", got, sent)
		}
		d := time.Since(start)
		out["bytes"], out["seconds"], out["mbit_s"] = sent, d.Seconds(), float64(sent)*8/d.Seconds()/1e6
	case "rtt":
		c, err := net.Dial("tcp", *addr)
		if err != nil {
			return err
		}
		defer c.Close()
		msg, got := make([]byte, *size), make([]byte, *size)
		var lat []time.Duration
		for i := 0; i < *n+50; i++ {
			t0 := time.Now()
			if _, err := c.Write(msg); err != nil {
				return err
			}
			if _, err := io.ReadFull(c, got); err != nil {
				return err
			}
			if i >= 50 { // warm-up
				lat = append(lat, time.Since(t0))
			}
		}
		sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
		out["p50_us"] = float64(lat[len(lat)/2].Microseconds())
		out["p99_us"] = float64(lat[len(lat)*99/100].Microseconds())
	case "setup":
		one := make([]byte, 1)
		start := time.Now()
		for i := 0; i < *n; i++ {
			c, err := net.Dial("tcp", *addr)
			if err != nil {
				return fmt.Errorf("connection %d: %w", i, err)
			}
			if _, err := c.Write(one); err != nil {
				return err
			}
			if _, err := io.ReadFull(c, one); err != nil {
				return fmt.Errorf("connection %d: %w", i, err)
			}
			c.Close()
		}
		d := time.Since(start)
		out["conns"], out["per_second"] = *n, float64(*n)/d.Seconds()
	case "hold":
		var conns []net.Conn
		one := make([]byte, 1)
		for i := 0; i < *n; i++ {
			c, err := net.Dial("tcp", *addr)
			if err != nil {
				return fmt.Errorf("connection %d: %w", i, err)
			}
			if _, err := c.Write(one); err != nil {
				return err
			}
			if _, err := io.ReadFull(c, one); err != nil {
				return fmt.Errorf("connection %d: %w", i, err)
			}
			conns = append(conns, c)
		}
		fmt.Println("held")
		sig := make(chan os.Signal, 1)
		signal.Notify(sig, syscall.SIGTERM, syscall.SIGINT)
		<-sig
		for _, c := range conns {
			c.Close()
		}
		return nil
	default:
		return fmt.Errorf("unknown mode %q", *mode)
	}
	return json.NewEncoder(os.Stdout).Encode(out)
}
