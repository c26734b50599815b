import ArgumentParser

@main
struct HostnetDNAT: AsyncParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "hostnet-dnat",
        abstract: "DNAT a node's own connections to its cluster's external Service IPs to targets that really serve them.",
        discussion: """
        A hostNetwork pod (or any node process) that connects to the external IP of a Service in its own \
        cluster often never gets an answer: the packet leaves for the load balancer and does not come back. \
        hostnet-dnat reads Services and EndpointSlices, plans a DNAT in the node's nat OUTPUT path for every \
        external IP:port, and prints the rules for review or applies them atomically.

        Examples:
          kubectl get services,endpointslices -A -o json > cluster.json
          hostnet-dnat render -f cluster.json --format nft      # review the rules
          hostnet-dnat apply -f cluster.json                    # install them (CAP_NET_ADMIN)
          hostnet-dnat diff -f cluster.json && echo up to date
          hostnet-dnat status --output json
          hostnet-dnat remove

        Exit status: 0 ok; 1 differences (diff) or the kernel refused; 64 usage; 65 bad input data \
        (also an input over --max-input-bytes); 66 input file missing; 69 a service or module is \
        unavailable; 73 an output file cannot be created; 74 a write failed (a full disk, a closed \
        stdout); 75 try again later; 77 no permission.
        """,
        version: "0.1.0",
        subcommands: [Render.self, Apply.self, Sync.self, Diff.self, Status.self, Remove.self])
}
