import Orchestration
import Testing

@Suite struct DurationTextTests {
    @Test(arguments: [("0", 0.0), ("0s", 0), ("250ms", 0.25), ("1s", 1), ("1.5s", 1.5), ("5m", 300), ("1h", 3600),
                      ("1h30m", 5400), ("100us", 0.0001), ("2m0.5s", 120.5)])
    func parsesKubeProxyDurations(text: String, seconds: Double) throws {
        let d = try #require(DurationText.parse(text))
        let got = Double(d.components.seconds) + Double(d.components.attoseconds) / 1e18
        #expect(abs(got - seconds) < 1e-9, "\(text) -> \(got)")
    }

    @Test(arguments: ["", "1", "s", "1x", "-1s", "1.2.3s", "1 s", "5min", "1e3s"])
    func rejectsOtherText(text: String) {
        #expect(DurationText.parse(text) == nil, "\(text)")
    }
}
