import Foundation
#if canImport(Glibc)
import Glibc
#endif
import KubeObjects
import NetAddress
@testable import NetlinkBackend
import RuleRendering
import RulePlanning
import ServiceResolution
import Testing
import TestSupport

/// Netlink apply vs `nft -f` of the rendered script, for a cluster file (e.g. from scripts/gen-cluster).
/// Runs only with HNDNAT_NETLINK_BENCH=<file>; HNDNAT_NETLINK_BENCH_ROUNDS (default 3) fresh namespaces per tool.
///
///   python3 scripts/gen-cluster --services 8000 -o /tmp/c.json
///   HNDNAT_NETLINK_BENCH=/tmp/c.json swift test --filter NetlinkBenchmark
///
/// The plan is the one `render -f <file> --target endpoints --external-ip-cidr 198.19.0.0/18
/// --external-ip-cidr 2001:db8:2::/48` makes (scripts/bench uses the same options).
@Suite("netlink apply vs nft -f benchmark", .serialized)
struct NetlinkBenchmark {
    @Test("apply and re-apply: netlink vs nft -f, fresh namespaces, median of N")
    func applyVersusNft() throws {
        guard let file = ProcessInfo.processInfo.environment["HNDNAT_NETLINK_BENCH"] else { return }
        guard try requireKernelTests(tools: ["nft"]) else { return }
        let rounds = Int(ProcessInfo.processInfo.environment["HNDNAT_NETLINK_BENCH_ROUNDS"] ?? "") ?? 3
        let bytes = try [UInt8](Data(contentsOf: URL(fileURLWithPath: file)))
        let objects = try DocumentLoader.load(bytes, source: file)
        let options = ResolutionOptions(target: .endpoints, externalIPAllowlist: [CIDR("198.19.0.0/18")!, CIDR("2001:db8:2::/48")!])
        let plan = try Planner(settings: PlanSettings(table: "hostnet-dnat")).plan(ServiceResolver(options: options).resolve(objects),
                                                                                 strategy: .endpoints)
        let script = try NftRenderer.render(plan)
        let scriptFile = FileManager.default.temporaryDirectory.appendingPathComponent("hnd-bench-\(getpid()).nft")
        try script.write(to: scriptFile, atomically: true, encoding: .utf8)
        defer { try? FileManager.default.removeItem(at: scriptFile) }
        let slots = plan.rules.reduce(0) { $0 + $1.mapping.target.destinations.count }
        print("bench: \(plan.rules.count) mappings, \(slots) endpoint slots, \(plan.nftPickChains.count) pick chains")

        func seconds(_ body: () throws -> Void) rethrows -> Double {
            let t = DispatchTime.now()
            try body()
            return Double(DispatchTime.now().uptimeNanoseconds - t.uptimeNanoseconds) / 1e9
        }
        func median(_ xs: [Double]) -> String { String(format: "%.3f", xs.sorted()[xs.count / 2]) }

        var build: [Double] = [], encode: [Double] = [], commitFirst: [Double] = [], commitAgain: [Double] = []
        var dump: [Double] = [], decode: [Double] = []
        var netlinkFirst: [Double] = [], netlinkAgain: [Double] = [], nftFirst: [Double] = [], nftAgain: [Double] = []
        var sizes = ""
        for _ in 0..<rounds {
            try withNamespaces(2, label: "bench") { ns in
                // The public path, as NodeBackend calls it: plan → operations → one batch → answers.
                netlinkFirst.append(try seconds { try ns[0].backend.apply(plan) })
                netlinkAgain.append(try seconds { try ns[0].backend.apply(plan) })
                nftFirst.append(try seconds { try ns[1].runChecked(["nft", "-f", scriptFile.path], timeout: 600) })
                nftAgain.append(try seconds { try ns[1].runChecked(["nft", "-f", scriptFile.path], timeout: 600) })
            }
            // The same, split into userspace (operations, libnftnl encoding) and the commit (sendmsg, in
            // which the kernel runs the whole transaction, then reading the acks).
            try withNamespace("bench-split") { ns in
                var ops: [NftOperation] = []
                build.append(try seconds { ops = try RulesetProgram.operations(plan) })
                var enc = NetlinkBatch.Encoded(bytes: [], beginSequence: 0, ranges: [])
                encode.append(seconds { enc = NetlinkBatch(ops).encode(beginSequence: 1) })
                sizes = "\(ops.count + 2) messages, \(enc.bytes.count) bytes"
                let session = try NetlinkSession.open(in: ns.netns)
                commitFirst.append(try seconds { _ = try NetlinkBatch(ops).commit(on: session.socket) })
                commitAgain.append(try seconds { _ = try NetlinkBatch(ops).commit(on: session.socket) })
                var dumped: DumpedTable?
                dump.append(try seconds { dumped = try ns.backend.dumpTable(family: .inet, name: plan.settings.table) })
                var installed: InstalledRuleset?
                decode.append(seconds { installed = RulesetDecoder.decode(dumped!) })
                #expect(installed == NftablesNetlink.expected(plan))
            }
        }
        print("bench: batch of \(sizes)")
        print("bench: netlink apply  first \(median(netlinkFirst)) s  re-apply \(median(netlinkAgain)) s   (all: \(netlinkFirst) / \(netlinkAgain))")
        print("bench: nft -f         first \(median(nftFirst)) s  re-apply \(median(nftAgain)) s   (all: \(nftFirst) / \(nftAgain))")
        print("bench: netlink split: operations \(median(build)) s, encode \(median(encode)) s, "
              + "commit (encode + send + kernel + acks) first \(median(commitFirst)) s, re-apply \(median(commitAgain)) s")
        print("bench: read back: dump \(median(dump)) s, decode \(median(decode)) s")
    }

    /// The same cluster file; one endpoint less in one EndpointSlice (the second endpoint of the first
    /// slice with at least three whose service is mapped), then back: `update` on a lasting connection
    /// (diff + encode + one batch + acks), fresh namespace per round, median of N.
    ///
    ///   HNDNAT_NETLINK_BENCH=/tmp/c.json swift test --filter NetlinkBenchmark/updateOneEndpoint
    @Test("update: one endpoint less and back, on a lasting connection, fresh namespaces, median of N")
    func updateOneEndpoint() throws {
        guard let file = ProcessInfo.processInfo.environment["HNDNAT_NETLINK_BENCH"] else { return }
        guard try requireKernelTests() else { return }
        let rounds = Int(ProcessInfo.processInfo.environment["HNDNAT_NETLINK_BENCH_ROUNDS"] ?? "") ?? 3
        let objects = try DocumentLoader.load(try [UInt8](Data(contentsOf: URL(fileURLWithPath: file))), source: file)
        let options = ResolutionOptions(target: .endpoints, externalIPAllowlist: [CIDR("198.19.0.0/18")!, CIDR("2001:db8:2::/48")!])
        func plan(_ o: ClusterObjects) throws -> RulePlan {
            try Planner(settings: PlanSettings(table: "hostnet-dnat")).plan(ServiceResolver(options: options).resolve(o), strategy: .endpoints)
        }
        let before = try plan(objects)
        let mapped = Set(before.rules.map { "\($0.mapping.service)" })
        var changed = objects
        let i = try #require(changed.endpointSlices.firstIndex { s in
            s.endpoints.count >= 3 && mapped.contains("\(ObjectName(namespace: s.id.namespace, name: s.serviceName ?? ""))")
        })
        changed.endpointSlices[i].endpoints.remove(at: 1)
        let after = try plan(changed)
        let slots = before.rules.reduce(0) { $0 + $1.mapping.target.destinations.count }
        print("bench: \(before.rules.count) mappings, \(slots) endpoint slots; slice \(changed.endpointSlices[i].id) loses one endpoint")

        func seconds(_ body: () throws -> Void) rethrows -> Double {
            let t = DispatchTime.now()
            try body()
            return Double(DispatchTime.now().uptimeNanoseconds - t.uptimeNanoseconds) / 1e9
        }
        /// CPU time of the calling thread, user and system: the kernel runs the whole batch inside sendmsg, on
        /// this thread, so this is our cost and the kernel's without the time spent waiting for a busy CPU.
        func cpuSeconds(_ body: () throws -> Void) rethrows -> Double {
            var a = timespec(), b = timespec()
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &a)
            try body()
            clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b)
            return Double(b.tv_sec - a.tv_sec) + Double(b.tv_nsec - a.tv_nsec) / 1e9
        }
        func median(_ xs: [Double]) -> String { String(format: "%.2f ms", xs.sorted()[xs.count / 2] * 1000) }
        var diff: [Double] = [], diffCPU: [Double] = [], there: [Double] = [], back: [Double] = []
        var thereCPU: [Double] = [], backCPU: [Double] = []
        var reports: [ApplyReport] = []
        for _ in 0..<rounds {
            diff.append(try seconds { _ = try RulesetProgram.changes(from: before, to: after) })
            diffCPU.append(try cpuSeconds { _ = try RulesetProgram.changes(from: before, to: after) })
            try withNamespace("bench-update") { ns in
                let connection = try NftablesConnection(namespace: ns.netns)
                try connection.apply(before)
                var cpu = 0.0
                there.append(try seconds { cpu = try cpuSeconds { reports.append(try connection.update(from: before, to: after)) } })
                thereCPU.append(cpu)
                #expect(try connection.read(table: "hostnet-dnat") == NftablesNetlink.expected(after))
                back.append(try seconds { cpu = try cpuSeconds { reports.append(try connection.update(from: after, to: before)) } })
                backCPU.append(cpu)
                #expect(try connection.read(table: "hostnet-dnat") == NftablesNetlink.expected(before))
            }
        }
        print("bench: CPU time (this thread, user + system): diff \(median(diffCPU)); update \(median(thereCPU)), and back \(median(backCPU))")
        for r in reports.prefix(2) {
            print("bench: update: \(r.objectsChanged) objects (\(r.elementsAdded)+/\(r.elementsDeleted)- elements, "
                  + "\(r.chainsAdded)+/\(r.chainsDeleted)- chains), \(r.messages) messages, \(r.bytes) bytes, incremental \(r.incremental)")
        }
        print("bench: diff (changes) \(median(diff)); update one endpoint less \(median(there)), and back \(median(back))   "
              + "(all: \(there) / \(back))")
    }
}
