// The pod sandbox process (what registry.k8s.io/pause does): sleep as the pod's first process,
// reap orphaned children, exit on SIGTERM or SIGINT. Built by tests/cluster/build.sh into a
// one-file image, because this cluster pulls nothing from a registry.
package main

import (
	"os"
	"os/signal"
	"syscall"
)

func main() {
	signals := make(chan os.Signal, 8)
	signal.Notify(signals, syscall.SIGTERM, syscall.SIGINT, syscall.SIGCHLD)
	for s := range signals {
		if s != syscall.SIGCHLD {
			return
		}
		for {
			pid, err := syscall.Wait4(-1, nil, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
