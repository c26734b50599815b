import AgentOperations
import Foundation
import Testing
import TestSupport

/// `/metrics` read by a second, independent parser: the official Python client's
/// (`prometheus_client.parser`, installed by scripts/install-deps test), which is what Prometheus-side
/// tooling accepts. Both readings must agree sample for sample.
@Suite struct PrometheusClientCrossCheckTests {
    static let python = "/opt/hostnet-dnat-test-tools/bin/python"
    static let script = #"""
import sys, json
from prometheus_client.parser import text_string_to_metric_families
out = []
for fam in text_string_to_metric_families(sys.stdin.read()):
    for s in fam.samples:
        out.append({"family": fam.name, "type": fam.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps(out))
"""#

    @Test func theOfficialParserReadsTheSameSamples() throws {
        guard FileManager.default.isExecutableFile(atPath: Self.python) else {
            if ProcessInfo.processInfo.environment["CI"]?.lowercased() == "true" {
                throw TestSupportError("\(Self.python) missing under CI=true (scripts/install-deps test installs it)")
            }
            print("skipping: \(Self.python) not found (scripts/install-deps test installs it)")
            return
        }
        let m = AgentMetrics()
        m.syncFinished(kind: .full, duration: .milliseconds(80), mappingsByFamily: ["ipv4": 5, "ipv6": 2],
                       skippedByReason: ["headless": 1], at: Date())
        m.syncFailed(reason: "api")
        m.watchRestarted(resource: "endpointslices", reason: "timeout")
        m.networkProgrammed(latency: .milliseconds(30))
        m.conntrackEntriesDeleted(2)
        let text = m.exposition()
        let r = try Tools.run(Self.python, ["-c", Self.script], input: text, timeout: 60)
        #expect(r.succeeded, "\(r)")
        let parsed = try #require(try JSONSerialization.jsonObject(with: Data(r.stdout.utf8)) as? [[String: Any]])
        let ours = try PrometheusText(text)
        #expect(parsed.count == ours.samples.count)
        for sample in ours.samples {
            let match = parsed.first { ($0["name"] as? String) == sample.name && ($0["labels"] as? [String: String]) == sample.labels }
            // Equal up to the JSON round trip of the Python side (Foundation's JSON number parsing may differ in the last bit).
            let theirs = try #require(match?["value"] as? Double, "\(sample.name) \(sample.labels) missing")
            #expect(abs(theirs - sample.value) <= 1e-12 * max(1, abs(sample.value)), "\(sample.name) \(sample.labels): \(theirs) vs \(sample.value)")
        }
        // The types Prometheus will see.
        let types = Dictionary(parsed.map { ($0["family"] as? String ?? "", $0["type"] as? String ?? "") }) { a, _ in a }
        #expect(types["hostnet_dnat_sync_duration_seconds"] == "histogram")
        #expect(types["hostnet_dnat_mappings"] == "gauge")
        #expect(types["hostnet_dnat_sync_errors"] == "counter")   // the client strips _total from family names
        #expect(types["process_cpu_seconds"] == "counter")
    }
}
