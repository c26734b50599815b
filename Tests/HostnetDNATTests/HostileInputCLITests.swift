import Foundation
import Testing
import TestSupport

/// What an unlucky operator feeds the CLI: empty files, endless devices, oversized inputs.
@Suite struct HostileInputCLITests {
    @Test(arguments: ["", "   \n\t\n", "# kubectl failed\n", "---\n---\n", "\u{FEFF}"])
    func anInputWithNoDocumentIsBadData(text: String) throws {
        // The input is read before any node is looked at, so apply and diff fail before the kernel.
        for args in [["render"], ["apply", "--dry-run", "--target", "endpoints"], ["diff", "--target", "endpoints"]] {
            let r = try CLI.run(args + ["-f", "-"], stdin: text)
            #expect(r.status == 65, "\(args) \(text.debugDescription): \(r.stderr)")
            #expect(r.stderr == "hostnet-dnat: error: <stdin>: holds no Kubernetes object (it is empty or only whitespace and comments); an empty cluster is a List with no items (kind: List, items: [])\n")
        }
    }

    @Test func anEmptyListIsAnEmptyCluster() throws {
        for text in [#"{"apiVersion":"v1","kind":"List","items":[]}"#, "kind: ServiceList\nitems: []\n", "{kind: List, items: []}"] {
            let r = try CLI.run(["render", "-f", "-"], stdin: text)
            #expect(r.status == 0, "\(text): \(r.stderr)")
            #expect(r.stderr.contains("0 mapping(s) from 0 service(s)"))
        }
    }

    @Test func anInputOverTheLimitIsRefusedWithTheLimit() throws {
        let size = try FileManager.default.attributesOfItem(atPath: CLI.root.appendingPathComponent("examples/cluster.yaml").path)[.size] as! Int
        let over = try CLI.run(["render", "-f", "examples/cluster.yaml", "--max-input-bytes", String(size - 1)])
        #expect(over.status == 65)
        #expect(over.stderr == "hostnet-dnat: error: examples/cluster.yaml: larger than the input limit of \(size - 1) bytes; raise it with --max-input-bytes\n")
        #expect(try CLI.run(["render", "-f", "examples/cluster.yaml", "--max-input-bytes", String(size)]).status == 0)
        // The same file through a pipe: read until the limit is passed, then refused.
        let text = try String(contentsOf: CLI.root.appendingPathComponent("examples/cluster.yaml"), encoding: .utf8)
        let piped = try CLI.run(["render", "-f", "-", "--max-input-bytes", String(size - 1)], stdin: text)
        #expect(piped.status == 65)
        #expect(piped.stderr.contains("<stdin>: larger than the input limit"))
        let bad = try CLI.run(["render", "-f", "examples/cluster.yaml", "--max-input-bytes", "0"])
        #expect(bad.status == 64)
    }

    @Test func anEndlessDeviceStopsAtTheLimit() throws {
        let r = try CLI.run(["render", "-f", "/dev/zero", "--max-input-bytes", "1048576"])
        #expect(r.status == 65)
        #expect(r.stderr == "hostnet-dnat: error: /dev/zero: larger than the input limit of 1 MiB; raise it with --max-input-bytes\n")
    }
}

/// `apply` never goes from N installed mappings to none on an input that does not say "no Services".
@Suite(.serialized) struct EmptyApplyKernelTests {
    @Test func applyRefusesToRemoveEverythingUnlessTheInputIsAnEmptyList() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        try withNamespace("emptyin") { ns in
            let first = try CLI.run(["apply", "-f", "examples/cluster.yaml", "--netns", ns.name, "--target", "endpoints",
                                     "--external-ip-cidr", "192.0.2.0/24"])
            #expect(first.status == 0, "\(first.stderr)")
            let before = try ns.ruleset()
            #expect(before.contains("elements = {"))
            // No document at all: bad data, nothing touched.
            let empty = try CLI.run(["apply", "-f", "-", "--netns", ns.name], stdin: "\n")
            #expect(empty.status == 65)
            #expect(try ns.ruleset() == before)
            // Objects, but no Service and no empty List (the wrong file): refused.
            let configMaps = #"{"apiVersion":"v1","kind":"List","items":[{"apiVersion":"v1","kind":"ConfigMap","metadata":{"name":"c"}}]}"#
            let wrong = try CLI.run(["apply", "-f", "-", "--netns", ns.name], stdin: configMaps)
            #expect(wrong.status == 65, "\(wrong.stderr)")
            #expect(wrong.stderr.contains("error: refusing to remove all 9 installed mapping(s): the input yields no mapping and is not an empty List"), "\(wrong.stderr)")
            #expect(try ns.ruleset() == before)
            // A namespace filter that matches nothing: refused too.
            let typo = try CLI.run(["apply", "-f", "examples/cluster.yaml", "--netns", ns.name, "--namespace", "nosuch"])
            #expect(typo.status == 65)
            #expect(try ns.ruleset() == before)
            // --allow-empty does it.
            let allowed = try CLI.run(["apply", "-f", "-", "--netns", ns.name, "--allow-empty"], stdin: configMaps)
            #expect(allowed.status == 0, "\(allowed.stderr)")
            #expect(!(try ns.ruleset()).contains("elements = {"))
            // And so does an explicit empty List, with no flag.
            #expect(try CLI.run(["apply", "-f", "examples/cluster.yaml", "--netns", ns.name, "--target", "endpoints",
                                 "--external-ip-cidr", "192.0.2.0/24"]).status == 0)
            let list = try CLI.run(["apply", "-f", "-", "--netns", ns.name], stdin: #"{"apiVersion":"v1","kind":"List","items":[]}"#)
            #expect(list.status == 0, "\(list.stderr)")
            #expect(!(try ns.ruleset()).contains("elements = {"))
        }
    }
}

/// Where output goes, and what messages may contain.
@Suite struct HostileSurroundingsCLITests {
    /// Runs `script` with sh, the binary's path in $BIN, from the package root.
    func sh(_ script: String, prefix: [String] = []) throws -> ProcessResult {
        FileManager.default.changeCurrentDirectoryPath(CLI.root.path)
        let command = prefix + ["sh", "-c", script, "sh", CLI.binary.path]
        return try Tools.run(command[0], Array(command.dropFirst()), timeout: 300)
    }

    @Test("-o replaces only regular files: a device node, a FIFO and a symlink are written in place (private mount namespace)")
    func outputFileKeepsWhatIsNotARegularFile() throws {
        guard try requireKernelTests(tools: ["unshare", "mknod", "stat"]) else { return }
        let dir = NSTemporaryDirectory() + "hnd-o-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let r = try sh("""
            set -e
            BIN="$1"; D="\(dir)"
            mount -t tmpfs hnd-o "$D"
            mknod "$D/null" c 1 3
            echo old > "$D/real"; ln -s real "$D/link"
            echo keep > "$D/plain"; chmod 600 "$D/plain"
            R="render -f examples/cluster.yaml --external-ip-cidr 192.0.2.0/24"
            "$BIN" $R -o "$D/null"; "$BIN" $R -o "$D/link"; "$BIN" $R -o "$D/plain"; "$BIN" $R -o "$D/new"
            stat -c '%n %F %a' "$D/null" "$D/link" "$D/real" "$D/plain" "$D/new" | sed "s|$D/||"
            cmp "$D/real" "$D/new" && cmp "$D/plain" "$D/new" && echo same
            ls "$D" | paste -sd' '
            """, prefix: ["unshare", "--mount", "--propagation", "private"])
        #expect(r.status == 0, "\(r.stderr)")
        #expect(r.stdout == """
            null character special file 644
            link symbolic link 777
            real regular file 644
            plain regular file 600
            new regular file 644
            same
            link new null plain real

            """, "\(r.stdout)")
    }

    @Test("a full or closed stdout is exit 74 with a message, not a crash", arguments: [">/dev/full", ">&-"])
    func writeErrorsAreIOErrors(redirect: String) throws {
        let r = try sh("\"$1\" render -f examples/cluster.yaml --external-ip-cidr 192.0.2.0/24 \(redirect)")
        #expect(r.status == 74, "\(r.stderr)")
        #expect(r.stderr.hasPrefix("hostnet-dnat: error: cannot write to standard output ("), "\(r.stderr)")
        #expect(!r.stderr.contains("Fatal error") && !r.stderr.contains("backtrace"))
    }

    @Test("apply that cannot print its result says what it did, and exits 74")
    func applyReportsWhatItDidWhenStdoutFails() throws {
        guard try requireKernelTests(tools: ["nft"]) else { return }
        try withNamespace("fullout") { ns in
            let r = try sh("\"$1\" apply -f examples/cluster.yaml --netns \(ns.name) --target endpoints --output json >/dev/full")
            #expect(r.status == 74, "\(r.stderr)")
            #expect(r.stderr.hasPrefix("hostnet-dnat: error: applied: "), "\(r.stderr)")
            #expect(r.stderr.contains("; but cannot write to standard output (No space left on device)"), "\(r.stderr)")
            #expect(try ns.ruleset().contains("dnat"))
        }
    }

    @Test("names from the input cannot forge a line or reach the terminal raw")
    func messagesAreEscaped() throws {
        // Two services on one IP and port: the conflict error names both.
        func svc(_ name: String) -> String {
            let quoted = String(data: try! JSONSerialization.data(withJSONObject: [name], options: [.fragmentsAllowed]), encoding: .utf8)!.dropFirst().dropLast()
            return #"{"apiVersion":"v1","kind":"Service","metadata":{"name":\#(quoted),"namespace":"n"},"spec":{"type":"LoadBalancer","clusterIP":"198.18.0.1","ports":[{"port":80}]},"status":{"loadBalancer":{"ingress":[{"ip":"203.0.113.9"}]}}}"#
        }
        let input = #"{"apiVersion":"v1","kind":"List","items":["# + svc("a\nhostnet-dnat: error: forged\u{1B}[31m") + "," + svc("b") + "]}"
        let r = try CLI.run(["render", "-f", "-", "--target", "cluster-ip"], stdin: input)
        #expect(r.status == 65, "\(r.stderr)")
        #expect(!r.stderr.contains("\u{1B}"))
        for line in r.stderr.split(separator: "\n") {
            #expect(line.hasPrefix("hostnet-dnat: ") || line.hasPrefix("  "), "forged line: \(line)")
        }
        #expect(r.stderr.contains("\\u{1b}[31m"), "\(r.stderr)")
    }

    @Test("--priority -101 parses; nat priorities the kernel refuses are usage errors")
    func priorities() throws {
        let ok = try CLI.run(["render", "-f", "examples/cluster.yaml", "--priority", "-101"])
        #expect(ok.status == 0, "\(ok.stderr)")
        #expect(ok.stdout.contains("priority -101"), "\(ok.stdout)")
        for p in ["-200", "-300"] {
            let bad = try CLI.run(["render", "-f", "examples/cluster.yaml", "--priority", p])
            #expect(bad.status == 64)
            #expect(bad.stderr == "hostnet-dnat: error: --priority \(p): a nat chain needs a priority above -200 (where conntrack runs); the kernel refuses it\n")
        }
    }

    @Test("--netns at a file that is not a network namespace is a usage error")
    func netnsMustBeANetworkNamespace() throws {
        for (path, why) in [("/etc/hostname", "is not a namespace file"), ("/proc/self/ns/mnt", "is not a network namespace")] {
            let r = try CLI.run(["status", "--netns", path])
            #expect(r.status == 64, "\(path): \(r.stderr)")
            #expect(r.stderr.contains("--netns \(path): "), "\(r.stderr)")
            #expect(r.stderr.contains(why), "\(r.stderr)")
        }
    }

    @Test("a credential for an http:// server is a warning on stderr")
    func plainHTTPCredentialWarns() throws {
        let dir = NSTemporaryDirectory() + "hnd-http-\(UUID().uuidString)"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        let config = dir + "/config"
        try """
            apiVersion: v1
            kind: Config
            current-context: c
            clusters: [{name: c, cluster: {server: "http://127.0.0.1:1"}}]
            users: [{name: u, user: {token: plain-text-token-123}}]
            contexts: [{name: c, context: {cluster: c, user: u}}]
            """.write(toFile: config, atomically: true, encoding: .utf8)
        let r = try CLI.run(["render", "--kubeconfig", config])
        #expect(r.status == 69, "\(r.stderr)")
        #expect(r.stderr.hasPrefix("hostnet-dnat: warning: kubeconfig \(config) (context \"c\"): the API server http://127.0.0.1:1 is plain http://, so kubeconfig user \"u\" sends its bearer token unencrypted; use https://\n"), "\(r.stderr)")
        #expect(!r.stderr.contains("plain-text-token-123"))
    }
}
